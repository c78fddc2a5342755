"""Lateral label pairs: training flips exchange right/left ids (kidneys, adrenals, parotids)."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt

from alice3d.config import ConfigError, load_config
from alice3d.finetune.config import AugConfig, FinetuneConfig
from alice3d.finetune.data import Case, TrainSamples, prepare_case
from alice3d.finetune.tasks import BTCV_LABELS, FLARE22_LABELS, TaskSpec, lateral_pairs_from_names, resolve_task
from alice3d.finetune.transforms import RandLateralFlipd, flip_transforms, swap_label_ids, train_random_transforms

R_KIDNEY, L_KIDNEY, LIVER = 2, 3, 6  # BTCV ids (REFERENCE.md section E)
NO_AUG = dict(rot90_prob=0.0, shift_prob=0.0, scale_prob=0.0, blur_prob=0.0)


def _centroid(label: torch.Tensor, k: int) -> np.ndarray:
    return torch.nonzero(torch.as_tensor(label)[0] == k).float().mean(0).numpy()


def _right_object_case():
    """(1, 8, 6, 4): a right kidney (id 2) at high axis-0 indices (patient right in RAS), a liver
    (id 6) beside it; the image carries the axis-0 index so its flip is visible too."""
    label = torch.zeros(1, 8, 6, 4)
    label[0, 6:8, 1:3, 1:3] = R_KIDNEY
    label[0, 3:5, 3:6, 0:2] = LIVER
    image = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1).expand(1, 8, 6, 4).clone()
    return image, label


def test_left_right_flip_moves_the_right_kidney_left_and_labels_it_left():
    image, label = _right_object_case()
    flip = RandLateralFlipd(keys=["image", "label"], pairs=[(2, 3), (12, 13)], prob=1.0, spatial_axis=0)
    out = flip({"image": image, "label": label})
    lab = torch.as_tensor(out["label"])
    assert not (lab == R_KIDNEY).any()
    assert torch.equal(torch.nonzero(lab[0] == L_KIDNEY), torch.nonzero(label[0].flip(0) == R_KIDNEY))
    assert _centroid(lab, L_KIDNEY)[0] == pytest.approx(0.5)  # was at 6.5: now on the left (low x)
    assert torch.equal(lab[0] == LIVER, label[0].flip(0) == LIVER)  # unpaired organs keep their id
    assert torch.as_tensor(out["image"])[0, :, 0, 0].tolist() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert torch.equal(label, _right_object_case()[1])  # the input is not modified in place
    # Inverting undoes both the flip and the swap.
    back = flip.inverse(out)
    assert torch.equal(torch.as_tensor(back["label"]), label) and torch.equal(torch.as_tensor(back["image"]), image)


def test_without_lateral_pairs_a_flip_swaps_nothing():
    image, label = _right_object_case()
    task = resolve_task("custom", labels=["a", "right_kidney_x", "c"], spacing=(4.0, 4.0, 4.0), roi=(8, 6, 4))
    assert task.lateral_pairs == ()
    steps = flip_transforms(["image", "label"], 3, 1.0, task.lateral_pairs)
    assert [type(s) for s in steps] == [mt.RandFlipd] * 3
    out = steps[0]({"image": image, "label": label})
    lab = torch.as_tensor(out["label"])
    assert _centroid(lab, R_KIDNEY)[0] == pytest.approx(0.5) and not (lab == L_KIDNEY).any()
    # Same for the explicit "no pairs" of a task that has some by default.
    assert resolve_task("btcv", lateral_pairs=[]).lateral_pairs == ()
    assert swap_label_ids(label, ()).equal(label)


def test_flip_draws_follow_the_seed_like_randflipd():
    image, label = _right_object_case()
    lateral = RandLateralFlipd(keys=["image", "label"], pairs=[(2, 3)], prob=0.3, spatial_axis=0)
    plain = mt.RandFlipd(keys=["image", "label"], prob=0.3, spatial_axis=0)

    def draws(t, seed):
        t.set_random_state(seed=seed)
        out = []
        for _ in range(200):
            lab = torch.as_tensor(t({"image": image, "label": label})["label"])
            out.append(bool(lab[0, 0].any()))  # the object sits at x=0..1 only when flipped
        return out

    a = draws(lateral, 7)
    assert a == draws(lateral, 7) == draws(plain, 7)  # same decisions as RandFlipd with the same seed
    assert a != draws(lateral, 8)
    assert 0.2 < sum(a) / len(a) < 0.4  # prob 0.3
    # Flipped draws carry the left label, unflipped ones the right label.
    lateral.set_random_state(seed=7)
    for flipped in a[:50]:
        lab = torch.as_tensor(lateral({"image": image, "label": label})["label"])
        assert bool((lab == L_KIDNEY).any()) == flipped and bool((lab == R_KIDNEY).any()) != flipped


def test_ras_orientation_puts_patient_right_on_axis_0_high_then_the_flip_relabels(tmp_path):
    """A case stored LPS (axis 0 towards the patient's left): after preprocessing (RAS) the right
    kidney is at high axis-0 indices; the training flip of axis 0 moves it low and labels it left."""
    shape = (20, 12, 8)
    lps = np.array([[-4.0, 0, 0, 40.0], [0, -4.0, 0, 20.0], [0, 0, 4.0, 0.0], [0, 0, 0, 1]])
    img = np.full(shape, -1000.0, np.float32)
    img[1:19, 1:11, 1:7] = 40.0  # soft-tissue body in air
    lab = np.zeros(shape, np.int16)
    lab[1:4, 4:8, 2:6] = R_KIDNEY  # low LPS index = world x 40 - 4i, large x: patient right (RAS +x)
    lab[14:18, 4:8, 2:6] = L_KIDNEY
    world_x = lambda i: (lps @ np.array([i, 0, 0, 1.0]))[0]  # noqa: E731
    assert world_x(2) > world_x(16)  # the right kidney really is on the patient's right
    nib.save(nib.Nifti1Image(img, lps), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(lab, lps), tmp_path / "lab.nii.gz")
    task = resolve_task("btcv", spacing=(4.0, 4.0, 4.0), roi=(16, 16, 8))
    prepared = prepare_case(Case("c", str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz")), task)
    assert prepared.affine[0, 0] > 0  # RAS: axis 0 runs towards the patient's right
    x_right, x_left = _centroid(prepared.label, R_KIDNEY)[0], _centroid(prepared.label, L_KIDNEY)[0]
    assert x_right > x_left
    out = RandLateralFlipd(keys=["image", "label"], pairs=task.lateral_pairs, prob=1.0, spatial_axis=0)(
        {"image": prepared.image, "label": prepared.label})
    n = prepared.label.shape[1]
    assert _centroid(out["label"], L_KIDNEY)[0] == pytest.approx(n - 1 - x_right)  # moved left, labelled left
    assert _centroid(out["label"], R_KIDNEY)[0] == pytest.approx(n - 1 - x_left)


def test_every_flip_and_rotation_keeps_right_on_the_side_anterior_cross_superior():
    """'Right' is anterior x superior of the body. Markers for the front (id 1) and the head end
    (id 4) travel with the augmentation; for every combination of axis flips and in-plane
    rotations the object labelled right lies on that side. A swap on the left-right flip only
    would break it for flips of the other axes (and disagree with RandRotate90d)."""
    label = torch.zeros(1, 10, 10, 10)
    label[0, 7:9, 4:6, 4:6] = R_KIDNEY
    label[0, 1:3, 4:6, 4:6] = L_KIDNEY
    label[0, 4:6, 8:10, 4:6] = 1  # anterior marker (high y)
    label[0, 4:6, 4:6, 8:10] = 4  # superior marker (high z)
    image = torch.zeros_like(label)
    centre = np.full(3, 4.5)
    pairs = resolve_task("btcv").lateral_pairs
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), r) for r in range(4)):
        for k in range(4):
            d = {"image": image, "label": label}
            for a in axes:
                d = RandLateralFlipd(keys=["image", "label"], pairs=pairs, prob=1.0, spatial_axis=a)(d)
            d = mt.Rotate90d(keys=["image", "label"], k=k, spatial_axes=(0, 1))(d)
            lab = d["label"]
            anterior, superior = _centroid(lab, 1) - centre, _centroid(lab, 4) - centre
            right = _centroid(lab, R_KIDNEY) - _centroid(lab, L_KIDNEY)
            assert float(np.dot(right, np.cross(anterior, superior))) > 0, (axes, k)


def test_training_samples_use_the_lateral_flip_and_stay_deterministic():
    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(8, 6, 4))
    steps = train_random_transforms(task, AugConfig(flip_prob=0.5, **NO_AUG)).transforms
    flips = [s for s in steps if isinstance(s, mt.RandFlipd)]
    assert [type(f) for f in flips] == [RandLateralFlipd] * 3 and [f.pairs for f in flips] == [((2, 3), (12, 13))] * 3
    assert [f.flipper.spatial_axis for f in flips] == [0, 1, 2]
    cls = train_random_transforms(resolve_task("classification"), AugConfig(flip_prob=0.5)).transforms
    assert all(type(s) is not RandLateralFlipd for s in cls)

    image, label = _right_object_case()
    view = {"image": image * 0 + 0.5, "label": label, "label_fg": torch.nonzero(label.flatten() > 0)[:, 0].numpy(),
            "label_bg": torch.nonzero(label.flatten() == 0)[:, 0].numpy()}
    ds = TrainSamples(1, lambda k: view, task, AugConfig(flip_prob=0.5, **NO_AUG), seed=1)
    assert torch.equal(ds[3]["label"], ds[3]["label"])
    relabelled = []
    for i in range(40):
        ids = set(ds[i]["label"].unique().tolist())
        assert ids in ({0.0, 2.0, 6.0}, {0.0, 3.0, 6.0})  # the one kidney, labelled right or left
        relabelled.append(3.0 in ids)
    assert 0 < sum(relabelled) < 40  # an odd number of flips relabels it, an even number does not


def test_presets_and_name_inference():
    assert resolve_task("btcv").lateral_pairs == ((2, 3), (12, 13))
    assert [BTCV_LABELS[i] for p in resolve_task("btcv").lateral_pairs for i in p] == [
        "right_kidney", "left_kidney", "right_adrenal_gland", "left_adrenal_gland"]
    f = resolve_task("flare22").lateral_pairs
    assert f == ((2, 13), (7, 8))
    assert [FLARE22_LABELS[i] for p in f for i in p] == ["right_kidney", "left_kidney", "right_adrenal_gland",
                                                        "left_adrenal_gland"]
    assert lateral_pairs_from_names(BTCV_LABELS) == resolve_task("btcv").lateral_pairs
    assert lateral_pairs_from_names(FLARE22_LABELS) == f
    assert resolve_task("classification").lateral_pairs == ()
    names = {0: "background", 1: "Brainstem", 2: "Parotid_L", 3: "Parotid_R", 4: "RightLung", 5: "LeftLung",
             6: "Lens L", 7: "Lens R", 8: "Lens R", 9: "Left", 10: "Spinal cord"}
    # Lenses: two "Lens R" are ambiguous, left out; a bare "Left" names no structure.
    assert lateral_pairs_from_names(names) == ((3, 2), (4, 5))
    t = resolve_task("custom", labels=["Brainstem", "Parotid_L", "Parotid_R"])
    assert t.lateral_pairs == ((3, 2),)
    assert resolve_task("custom", labels=["Brainstem", "Parotid_L", "Parotid_R"], lateral_pairs=[]).lateral_pairs == ()
    assert resolve_task("custom", labels=["a", "b", "c"], lateral_pairs=[[1, 3]]).lateral_pairs == ((1, 3),)


def test_lateral_pairs_config_and_errors():
    cfg = load_config(FinetuneConfig, None, ["task.lateral_pairs=[[2, 3], [12, 13]]"])
    assert cfg.task.lateral_pairs == [[2, 3], [12, 13]]
    assert load_config(FinetuneConfig, None, ["task.lateral_pairs=[]"]).task.lateral_pairs == []
    assert load_config(FinetuneConfig, None, []).task.lateral_pairs is None
    assert load_config(FinetuneConfig, None, ["task.lateral_pairs=null"]).task.lateral_pairs is None
    with pytest.raises(ConfigError, match=r"task.lateral_pairs: pair \[0, 3\] must name two different organ ids"):
        resolve_task("btcv", lateral_pairs=[[0, 3]])
    with pytest.raises(ConfigError, match=r"pair \[2, 14\]"):
        resolve_task("btcv", lateral_pairs=[[2, 14]])
    with pytest.raises(ConfigError, match=r"label id\(s\) \[3\] appear in more than one pair"):
        resolve_task("btcv", lateral_pairs=[[2, 3], [3, 4]])
    with pytest.raises(ConfigError, match="pairs of two label ids"):
        resolve_task("btcv", lateral_pairs=[[2, 3, 4]])
    with pytest.raises(ConfigError, match="classification task has none"):
        resolve_task("classification", lateral_pairs=[[0, 1]])


def test_task_spec_round_trip_keeps_pairs_and_reads_old_checkpoints():
    t = resolve_task("btcv")
    d = json.loads(json.dumps(t.to_dict()))
    assert d["lateral_pairs"] == [[2, 3], [12, 13]] and TaskSpec.from_dict(d) == t
    old = dict(d)
    del old["lateral_pairs"]  # best.pt of a run made before lateral pairs existed
    assert TaskSpec.from_dict(old).lateral_pairs == ()
