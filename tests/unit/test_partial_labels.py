"""Partial labels: a class a case does not contour is unknown, not background.

Marginal DiceCE (unknown classes merged into background) with hand-computed values and its
gradient property, equality with MONAI's DiceCE when every class is known, the per-case
``known`` vector through datalist, crops, lateral flips and collation, partial-aware
Dice/NSD averaging, and an end-to-end ``custom`` task whose dataset.json has ``contoured``.
"""

from __future__ import annotations

import json
import math
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from torch.utils.data import default_collate

from alice3d.data.io import DataError
from alice3d.finetune.config import AugConfig
from alice3d.finetune.data import Case, TrainSamples, case_store, known_classes, prepare_case, read_datalist
from alice3d.finetune.metrics import aggregate, case_metrics, results_markdown
from alice3d.finetune.objectives import SegmentationTask, marginal_dice_ce
from alice3d.finetune.tasks import resolve_task

S = 1e-5  # MONAI's smooth_nr = smooth_dr
NO_AUG = dict(rot90_prob=0.0, shift_prob=0.0, scale_prob=0.0, blur_prob=0.0)


def _logits(probs_per_voxel):
    """(1, K, V, 1, 1) logits whose softmax is the given per-voxel probabilities ``[[p_0..p_K-1], ...]``."""
    p = torch.tensor(probs_per_voxel, dtype=torch.float64).T  # (K, V)
    return p.log().reshape(1, p.shape[0], p.shape[1], 1, 1).float()


def _label(ids):
    return torch.tensor(ids, dtype=torch.float32).reshape(1, 1, len(ids), 1, 1)


def _seg_task(num_classes: int):
    task = resolve_task("custom", labels=[f"organ{i}" for i in range(1, num_classes)], spacing=(4.0, 4.0, 4.0),
                        roi=(8, 8, 8))
    return SegmentationTask(torch.nn.Identity(), {"name": "identity", "args": {}}, task)


# ----------------------------------------------------------------------------- loss


def test_two_class_toy_unknown_organ_predicted_in_background_costs_nothing():
    # bg + one organ the sample does not contour; the label is all background, the network predicts
    # the organ with p = 0.9 in two of the four voxels.
    label = _label([0, 0, 0, 0])
    organ = _logits([[0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.7, 0.3]]).requires_grad_()
    background = _logits([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    unknown = torch.tensor([[True, False]])
    loss = marginal_dice_ce(organ, label, unknown)
    # Merged background probability is 1 everywhere: CE = -log 1 = 0, Dice = 1 - (2*4+s)/(4+4+s) = 0.
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert marginal_dice_ce(background, label, unknown).item() == pytest.approx(loss.item(), abs=1e-7)
    loss.backward()
    assert organ.grad.abs().max().item() < 1e-7  # no gradient on any logit, the organ's included
    # With the organ known the same prediction is penalised, and more than predicting background.
    full = DiceCELoss(to_onehot_y=True, softmax=True)
    assert full(organ.detach(), label).item() > full(background, label).item() > 0.1


def test_three_class_hand_values_and_gradient_property():
    # Voxel 0 is organ A (known), voxel 1 background; organ B is not contoured and is the
    # network's favourite (p = 0.5) in the background voxel.
    z = _logits([[0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]).requires_grad_()
    label = _label([1, 0])
    known = torch.tensor([[True, True, False]])
    loss = marginal_dice_ce(z, label, known)
    # Merged (bg + B, A): voxel 0 (0.5, 0.5), voxel 1 (0.75, 0.25).
    ce = (math.log(2) + math.log(4 / 3)) / 2
    dice_bg = 1 - (2 * 0.75 + S) / (1.25 + 1 + S)  # p_bg = [0.5, 0.75], target [0, 1]
    dice_a = 1 - (2 * 0.5 + S) / (0.75 + 1 + S)  # p_A = [0.5, 0.25], target [1, 0]
    assert loss.item() == pytest.approx(ce + (dice_bg + dice_a) / 2, abs=1e-6)
    # The same as if the network had predicted background there instead of B (p_bg, p_B swapped).
    as_background = _logits([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]])
    assert marginal_dice_ce(as_background, label, known).item() == pytest.approx(loss.item(), abs=1e-6)
    # Gradient property: moving probability between background and B at fixed total is free,
    # i.e. dL/dz_B * p_bg == dL/dz_bg * p_B at every voxel (zero along that direction).
    loss.backward()
    g = z.grad[0, :, :, 0, 0]  # (K, V)
    p = torch.softmax(z.detach(), 1)[0, :, :, 0, 0]
    assert torch.allclose(g[2] * p[0], g[0] * p[2], atol=1e-7)
    assert g[2].abs().max() > 1e-3  # not trivially zero: B still competes with A in voxel 0
    # With B known, the B prediction in the background voxel costs more than predicting background.
    every = torch.ones(1, 3, dtype=torch.bool)
    assert marginal_dice_ce(z.detach(), label, every) > marginal_dice_ce(as_background, label, every)


def test_all_known_is_exactly_monai_dicece():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 3)
    label = torch.randint(0, 4, (2, 1, 6, 5, 3)).float()
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    obj = _seg_task(4)
    every = torch.ones(2, 4, dtype=torch.bool)
    assert torch.equal(obj.loss(logits, label, every)["loss"], ref)  # the very same code path
    assert torch.equal(obj({"image": logits, "label": label, "known": every})["loss"], ref)
    assert torch.equal(obj.loss(logits, label)["loss"], ref)
    # The marginal formula itself reduces to DiceCE when nothing is merged.
    assert marginal_dice_ce(logits, label, every).item() == pytest.approx(ref.item(), abs=1e-6)


def test_mixed_batch_averages_dice_over_known_classes_and_ce_over_voxels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 2)
    label = torch.randint(0, 3, (2, 1, 4, 4, 2)).float()
    label[1][label[1] == 2] = 0  # sample 1 does not contour class 2
    known = torch.tensor([[True, True, True], [True, True, False]])
    got = marginal_dice_ce(logits, label, known)
    # Sample 0 alone: MONAI's Dice (mean of 3 classes) and CE; sample 1 alone: merged probabilities.
    d0 = DiceLoss(to_onehot_y=True, softmax=True)(logits[:1], label[:1]).item()
    ce0 = torch.nn.functional.cross_entropy(logits[:1], label[:1, 0].long()).item()
    p1 = torch.softmax(logits[1:], 1)
    merged = torch.cat([p1[:, :1] + p1[:, 2:], p1[:, 1:2]], 1)
    onehot = torch.cat([label[1:] == 0, label[1:] == 1], 1).float()
    tp, den = (merged * onehot).sum((2, 3, 4)), (merged + onehot).sum((2, 3, 4))
    d1 = (1 - (2 * tp + S) / (den + S))[0]
    ce1 = -(merged * onehot).sum(1).log().mean().item()
    expected = (3 * d0 + d1.sum().item()) / 5 + (ce0 + ce1) / 2
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_deep_supervision_uses_the_marginal_loss_at_every_scale():
    obj = _seg_task(3)
    torch.manual_seed(2)
    outs = [torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    label = torch.zeros(1, 1, 4, 4, 4)
    label[0, 0, :2] = 1
    known = torch.tensor([[True, True, False]])
    got = obj.loss(outs, label, known)
    from alice3d.finetune.objectives import resize_label

    terms = [marginal_dice_ce(o, resize_label(label, o.shape[2:]), known) for o in outs]
    assert torch.allclose(got["loss"], 2 / 3 * terms[0] + 1 / 3 * terms[1])
    assert torch.allclose(got["loss_ds1"], terms[1])


def test_a_voxel_of_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match="labelled with a class its sample does not contour"):
        marginal_dice_ce(torch.zeros(1, 3, 2, 1, 1), _label([2, 0]), torch.tensor([[True, True, False]]))


# ----------------------------------------------------------------------------- metrics


def _cube(shape, lo, hi, value):
    a = np.zeros(shape, np.int64)
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = value
    return a


def test_metrics_leave_unknown_organs_out_and_average_over_cases_that_contour_them():
    organs = {1: "A", 2: "B"}
    sh = (8, 8, 8)
    gt_full = _cube(sh, (0, 0, 0), (4, 4, 4), 1) + _cube(sh, (5, 5, 5), (7, 7, 7), 2)  # A 64 voxels, B 8
    # case a contours both: A perfect, B predicted on half of it (4 of 8 voxels) -> 2*4/12
    pred_a = _cube(sh, (0, 0, 0), (4, 4, 4), 1) + _cube(sh, (5, 5, 5), (7, 7, 6), 2)
    a = case_metrics(pred_a, gt_full, organs, [1.0, 1.0], (1, 1, 1), known=torch.tensor([True, True, True]))
    # case b contours A only: its label has no B, but the network predicts B (a 0 if it were scored);
    # A predicted on half of it -> 2*32/96
    gt_b = _cube(sh, (0, 0, 0), (4, 4, 4), 1)
    pred_b = _cube(sh, (0, 0, 0), (4, 4, 2), 1) + _cube(sh, (5, 5, 5), (7, 7, 7), 2)
    b = case_metrics(pred_b, gt_b, organs, [1.0, 1.0], (1, 1, 1), known=[1])
    # case c contours B only: B perfect; A predicted where the label says background -> not scored
    gt_c = _cube(sh, (5, 5, 5), (7, 7, 7), 2)
    pred_c = gt_c + _cube(sh, (0, 0, 0), (2, 2, 2), 1)
    c = case_metrics(pred_c, gt_c, organs, [1.0, 1.0], (1, 1, 1), known=torch.tensor([True, False, True]))
    assert a["dice"] == pytest.approx({"A": 1.0, "B": 8 / 12}) and "not_contoured" not in a
    assert b["dice"] == {"A": pytest.approx(2 / 3), "B": None} and b["nsd"]["B"] is None
    assert b["not_contoured"] == ["B"] and c["not_contoured"] == ["A"]
    assert c["dice"] == {"A": None, "B": 1.0} and c["nsd"]["A"] is None and c["nsd"]["B"] == pytest.approx(1.0)
    agg = aggregate({"a": a, "b": b, "c": c}, ["A", "B"])
    A, B = agg["per_organ"]["A"], agg["per_organ"]["B"]
    assert A["dice"]["n"] == 2 and A["dice"]["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert B["dice"]["n"] == 2 and B["dice"]["mean"] == pytest.approx((8 / 12 + 1) / 2)
    assert (A["n_contoured"], B["n_contoured"]) == (2, 2) and agg["partial_labels"] is True
    assert agg["mean_dice"] == pytest.approx(((1 + 2 / 3) / 2 + (8 / 12 + 1) / 2) / 2)
    # Scored as full labels, the unknown predictions would have been zeros: (1 + 2/3 + 0) / 3 for A.
    b_full = case_metrics(pred_b, gt_b, organs, [1.0, 1.0], (1, 1, 1))
    assert b_full["dice"]["B"] == 0.0
    md = results_markdown({"task": "t", "model": "m", "n_cases": 3, "metrics": agg,
                           "nsd_tolerance_mm": {"A": 1.0, "B": 1.0}})
    assert "| cases | contoured |" in md and "| A | 83.33" in md and "| 1.0 | 2 | 2 |" in md
    assert "does not contour is left out of that case's Dice and NSD" in md


def test_metrics_with_every_class_known_are_unchanged():
    organs = {1: "A", 2: "B"}
    gt = _cube((6, 6, 6), (0, 0, 0), (3, 3, 3), 1)
    pred = gt.copy()
    pred[5, 5, 5] = 2
    old = case_metrics(pred, gt, organs, [1.0, 1.0], (1, 1, 1))
    assert case_metrics(pred, gt, organs, [1.0, 1.0], (1, 1, 1), known=known_classes(None, 3)) == old
    assert case_metrics(pred, gt, organs, [1.0, 1.0], (1, 1, 1), known=[0, 1, 2]) == old
    assert old["dice"] == {"A": 1.0, "B": 0.0}
    agg = aggregate({"x": old}, ["A", "B"])
    assert "partial_labels" not in agg and "n_contoured" not in agg["per_organ"]["A"]
    md = results_markdown({"task": "t", "model": "m", "n_cases": 1, "metrics": agg, "nsd_tolerance_mm": {}})
    assert "contoured" not in md


# ----------------------------------------------------------------------------- data


HN = {"0": "background", "1": "Brainstem", "2": "Parotid_L", "3": "Parotid_R"}


def _write_case(root, name, drop=()):
    """A 24 x 24 x 12 head-and-neck-like case at 2 mm; ``drop``: organ ids left out of its label map."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    img = np.full((24, 24, 12), -1000.0, np.float32)
    img[2:22, 2:22, 1:11] = 40 + rng.normal(0, 5, (20, 20, 10))
    lab = np.zeros((24, 24, 12), np.int16)
    lab[10:14, 4:10, 3:9] = 1
    lab[2:6, 12:18, 4:8] = 2  # left parotid: low x (RAS)
    lab[18:22, 12:18, 4:8] = 3
    for k in drop:
        lab[lab == k] = 0
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}


def test_datalist_contoured_lists_are_read_and_checked(tmp_path):
    task = resolve_task("custom", labels=["Brainstem", "Parotid_L", "Parotid_R"], spacing=(4.0, 4.0, 4.0),
                        roi=(8, 8, 8))
    e0, e1 = _write_case(tmp_path, "a", drop=(3,)), _write_case(tmp_path, "b")
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": [{**e0, "contoured": [2, 1, 0]}], "validation": [e1]}))
    lists = read_datalist(path, task)
    assert lists["training"][0].contoured == (1, 2) and lists["validation"][0].contoured is None
    assert known_classes((1, 2), 4).tolist() == [True, True, True, False]
    assert known_classes(None, 4).tolist() == [True] * 4
    for bad, msg in (([1, 7], r"'contoured' ids \[7\] that are not foreground labels"), ("1,2", "expected a list"),
                     ([1, True], "expected a list")):
        path.write_text(json.dumps({"training": [{**e0, "contoured": bad}], "validation": [e1]}))
        with pytest.raises(DataError, match=msg) as err:
            read_datalist(path, task)
        assert "dataset.json: entry 0 of 'training'" in str(err.value)
    # A label map that draws a class its entry says it does not contour is a bad case.
    wrong = Case("b", str(tmp_path / e1["image"]), str(tmp_path / e1["label"]), contoured=(1, 2))
    with pytest.raises(DataError, match=r"b.nii.gz: label ids \[3\] \(3=Parotid_R\) are drawn but .*'contoured'"):
        prepare_case(wrong, task)
    prepared = prepare_case(lists["training"][0], task)
    assert prepared.known.dtype == torch.bool and prepared.known.tolist() == [True, True, True, False]
    assert prepared.partial and not prepare_case(lists["validation"][0], task).partial


def test_known_vector_survives_crops_flips_and_collation(tmp_path):
    # Parotid_R (3) <-> Parotid_L (2) are a lateral pair: a flip relabels the one contoured parotid,
    # so the known vector must follow it, or the loss would drop the wrong parotid.
    task = resolve_task("custom", labels=["Brainstem", "Parotid_L", "Parotid_R"], spacing=(4.0, 4.0, 4.0),
                        roi=(8, 8, 8))
    assert task.lateral_pairs == ((3, 2),)
    case = Case("a", str(tmp_path / "imagesTr/a.nii.gz"), str(tmp_path / "labelsTr/a.nii.gz"), contoured=(1, 3))
    _write_case(tmp_path, "a", drop=(2,))
    prepared = [prepare_case(case, task)]
    store = case_store([case], prepared, task)
    ds = TrainSamples(1, store, task, AugConfig(flip_prob=0.5, **NO_AUG), seed=0)
    seen = set()
    for i in range(30):
        s = ds[i]
        assert s["known"].dtype == torch.bool and s["known"].shape == (4,) and s["label"].shape == (1, 8, 8, 8)
        known = s["known"].tolist()
        assert known in ([True, True, False, True], [True, True, True, False])
        ids = {int(v) for v in s["label"].unique()}
        assert ids <= {k for k in range(4) if known[k]}  # never a voxel of an unknown class
        seen.add(tuple(known))
    assert len(seen) == 2  # odd numbers of flips swapped it, even numbers did not
    assert prepared[0].known.tolist() == [True, True, False, True]  # the cache is never modified
    batch = default_collate([ds[0], ds[1]])
    assert batch["known"].shape == (2, 4) and batch["known"].dtype == torch.bool
    # The training objective consumes the batch as it comes.
    obj = _seg_task(4)
    logits = torch.randn(2, 4, 8, 8, 8)
    ref = marginal_dice_ce(logits, batch["label"], batch["known"])
    assert torch.equal(obj.loss(logits, batch["label"], batch["known"])["loss"], ref)


# ----------------------------------------------------------------------------- end to end


def test_custom_task_with_contoured_lists_end_to_end(tmp_path, monkeypatch):
    from alice3d.cli.finetune import main
    from alice3d.finetune import objectives

    known_seen = []

    def spy(logits, label, known, **kw):
        known_seen.append(known.detach().cpu().clone())
        return marginal_dice_ce(logits, label, known, **kw)

    monkeypatch.setattr(objectives, "marginal_dice_ce", spy)

    root = tmp_path / "hn"
    train = [{**_write_case(root, "t0", drop=(3,)), "contoured": [1, 2]},
             {**_write_case(root, "t1", drop=(1,)), "contoured": [2, 3]}]
    val = [_write_case(root, "v0"), {**_write_case(root, "v1", drop=(3,)), "contoured": [1, 2]}]
    (root / "dataset.json").write_text(json.dumps({"labels": HN, "training": train, "validation": val}))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--task", "custom", "--data-root", str(root), "--model", "unetr", "--out", str(out),
              "train.max_steps=2", "train.batch_size=2", "train.device=cpu", "task.spacing=[4,4,4]",
              "task.roi=[32,32,16]", "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=4",
              "model.feature_size=12", "eval.n_previews=0", "eval.sw_overlap=0.25", "train.eval_every=1"])
    assert e.value.code in (0, None)
    results = json.loads((out / "results.json").read_text())
    cases = results["cases"]
    assert cases["v1"]["not_contoured"] == ["Parotid_R"] and "not_contoured" not in cases["v0"]
    assert cases["v1"]["dice"]["Parotid_R"] is None and cases["v1"]["nsd"]["Parotid_R"] is None
    per = results["metrics"]["per_organ"]
    assert results["metrics"]["partial_labels"] is True
    assert per["Parotid_R"]["n_contoured"] == 1 and per["Parotid_L"]["n_contoured"] == 2
    assert per["Parotid_R"]["dice"]["n"] == 1 and per["Parotid_L"]["dice"]["n"] == 2
    assert per["Parotid_R"]["dice"]["mean"] == pytest.approx(cases["v0"]["dice"]["Parotid_R"])
    # The mean over organs uses each organ's own mean over the cases that contour it.
    organ_means = []
    for organ in ("Brainstem", "Parotid_L", "Parotid_R"):
        vals = [c["dice"][organ] for c in cases.values() if c["dice"][organ] is not None]
        assert per[organ]["dice"]["mean"] == pytest.approx(np.mean(vals))
        organ_means.append(np.mean(vals))
    assert results["metrics"]["mean_dice"] == pytest.approx(np.mean(organ_means))
    # best.pt was chosen on that same partial-aware mean (it is the best of the logged evaluations).
    best = torch.load(out / "best.pt", weights_only=True)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_dice = [r["val_mean_dice"] for r in logged if "val_mean_dice" in r]
    assert best["metrics"]["mean_dice"] == pytest.approx(max(val_dice))
    assert best["metrics"]["mean_dice"] == pytest.approx(results["metrics"]["mean_dice"])
    assert all(math.isfinite(r["loss"]) for r in logged if "loss" in r)
    # Both training steps took the marginal loss, with each case's unknown class (t0: Parotid_R,
    # t1: Brainstem; a lateral flip may have exchanged the parotids of t0).
    assert len(known_seen) == 2
    for k in known_seen:
        assert k.shape == (2, 4) and k[:, 0].all() and sorted(int(r.sum()) for r in k) == [3, 3]
        assert {tuple(r.tolist()) for r in k} <= {(True, True, True, False), (True, True, False, True),
                                                  (True, False, True, True)}
        assert (True, False, True, True) in {tuple(r.tolist()) for r in k}
    report = json.loads((out / "data_report.json").read_text())
    assert report["not_contoured"] == {"t0": ["Parotid_R"], "t1": ["Brainstem"], "v1": ["Parotid_R"]}
    md = (out / "results.md").read_text()
    assert "| cases | contoured |" in md and "| Parotid_R |" in md
