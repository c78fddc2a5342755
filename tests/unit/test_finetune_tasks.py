"""Tasks, config, datalists, splits, case checks, preprocessing and training samples."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.config import ConfigError, load_config
from alice3d.data.io import DataError
from alice3d.finetune.config import AugConfig, FinetuneConfig, FinetuneDataConfig
from alice3d.finetune.data import (
    Case,
    TrainSamples,
    case_store,
    folder_lists,
    labeled_subset,
    load_lists,
    make_splits,
    prepare_case,
    read_datalist,
    validation_count,
)
from alice3d.finetune.tasks import BTCV_LABELS, FLARE22_LABELS, TaskSpec, resolve_task
from alice3d.finetune.transforms import inference_transforms


def test_btcv_and_flare_presets():
    t = resolve_task("btcv")
    assert t.labels == BTCV_LABELS and len(t.foreground) == 13
    assert t.spacing == (1.5, 1.5, 2.0) and t.roi == (96, 96, 96) and t.hu_window == (-175.0, 250.0)
    assert t.labels[6] == "liver" and t.labels[13] == "left_adrenal_gland"
    assert resolve_task("btcv", phantom=True).roi == (64, 64, 32)
    f = resolve_task("flare22")
    assert len(f.foreground) == 13 and "duodenum" in f.foreground.values() and FLARE22_LABELS[1] == "liver"
    with pytest.raises(ConfigError, match="needs real data"):
        resolve_task("flare22", phantom=True)
    c = resolve_task("classification")
    assert c.kind == "classification" and c.hu_window == (-1000.0, 400.0) and c.roi == (128, 128, 64)


def test_custom_task_and_tolerances():
    t = resolve_task("custom", labels=["liver", "tumour"], nsd_tolerance_mm=2.0,
                     nsd_tolerance_per_organ={"tumour": 5.0})
    assert t.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert t.tolerances() == [2.0, 5.0]
    with pytest.raises(ConfigError, match="needs task.labels"):
        resolve_task("custom")
    with pytest.raises(ConfigError, match="unknown organ"):
        resolve_task("btcv", nsd_tolerance_per_organ={"heart": 1.0})
    assert TaskSpec.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_config_overrides_and_validation():
    cfg = load_config(FinetuneConfig, None, ["train.max_steps=7", "train.batch_size=3", "train.lr=0.5",
                                             "train.seed=4", "train.ckpt_every=2", "train.device=cpu",
                                             "data.on_bad_data=fail", "task.roi=[32,32,16]"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.train.seed) == (7, 3, 0.5, 4)
    assert cfg.data.on_bad_data == "fail" and cfg.task.roi == (32, 32, 16)
    with pytest.raises(ConfigError, match="data.on_bad_data"):
        load_config(FinetuneConfig, None, ["data.on_bad_data=ignore"])
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        load_config(FinetuneConfig, None, ["model.depth=3"])
    with pytest.raises(ConfigError, match="data.kfold"):
        load_config(FinetuneConfig, None, ["data.kfold=1"])


def _datalist(tmp_path, n_train=8, n_val=2):
    entries = [{"image": f"imagesTr/img{i:04d}.nii.gz", "label": f"labelsTr/label{i:04d}.nii.gz"} for i in range(n_train + n_val)]
    p = tmp_path / "dataset_0.json"
    p.write_text(json.dumps({"training": entries[:n_train], "validation": entries[n_train:]}))
    return p


def test_datalist_splits_kfold_and_label_fraction(tmp_path):
    task = resolve_task("btcv")
    lists = read_datalist(_datalist(tmp_path), task)
    assert len(lists["training"]) == 8 and lists["training"][0].id == "img0000"
    assert lists["training"][0].image == str((tmp_path / "imagesTr/img0000.nii.gz").resolve())
    (split,) = make_splits(lists, FinetuneDataConfig())
    assert [c.id for c in split.val] == ["img0008", "img0009"]
    folds = make_splits(lists, FinetuneDataConfig(kfold=5))
    assert len(folds) == 5
    val_ids = [c.id for f in folds for c in f.val]
    assert sorted(val_ids) == sorted(c.id for c in lists["training"] + lists["validation"])  # each case once
    for f in folds:
        assert not {c.id for c in f.train} & {c.id for c in f.val}
    assert [c.id for c in make_splits(lists, FinetuneDataConfig(kfold=5, fold=2))[0].val] == [c.id for c in folds[2].val]
    sub = labeled_subset(lists["training"], fraction=0.25, seed=3)
    assert len(sub) == 2 and sub == labeled_subset(lists["training"], fraction=0.25, seed=3)
    assert len(labeled_subset(lists["training"], n_labeled=3)) == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="malformed datalist JSON"):
        read_datalist(bad, task)
    no_val = tmp_path / "noval.json"
    no_val.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(DataError, match="no 'validation' cases; .*data.kfold"):
        make_splits(read_datalist(no_val, task), FinetuneDataConfig())



def _plain_folder(root, images, labels):
    for sub, names in (("imagesTr", images), ("labelsTr", labels)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            (root / sub / n).write_bytes(b"")  # pairing looks at names only; reading comes later
    return root


def test_plain_folder_without_datalist_is_paired_and_split(tmp_path, caplog):
    task = resolve_task("btcv")
    root = _plain_folder(tmp_path / "btcv", [f"img{i:04d}.nii.gz" for i in (3, 1, 5, 2, 4)],
                         [f"label{i:04d}.nii.gz" for i in range(1, 6)])
    caplog.set_level("INFO", logger="alice3d.finetune")
    lists, source = load_lists(str(root), task)
    assert source == str(root)
    assert [c.id for c in lists["training"]] == ["img0001", "img0002", "img0003", "img0004"]
    assert [c.id for c in lists["validation"]] == ["img0005"] and lists["test"] == []
    assert lists["validation"][0].label == str((root / "labelsTr" / "label0005.nii.gz").resolve())
    assert any("validation = the last 1 in file-name order (img0005)" in r.getMessage() for r in caplog.records)
    (split,) = make_splits(lists, FinetuneDataConfig(), source)
    assert [c.id for c in split.val] == ["img0005"] and len(split.train) == 4
    assert [validation_count(n) for n in (2, 4, 8, 10, 30)] == [1, 1, 2, 2, 6]
    # Same file names in labelsTr/ pair too; --data-root may also name imagesTr/ itself.
    same = _plain_folder(tmp_path / "same", ["a.nii.gz", "b.nii.gz"], ["a.nii.gz", "b.nii.gz"])
    lists = folder_lists(same / "imagesTr", task)
    assert [c.id for c in lists["training"]] == ["a"] and [c.id for c in lists["validation"]] == ["b"]
    assert lists["training"][0].label == str((same / "labelsTr" / "a.nii.gz").resolve())
    # A folder with a datalist is still read through it.
    (tmp_path / "dl").mkdir()
    _plain_folder(tmp_path / "dl", ["zzz.nii.gz"], ["zzz.nii.gz"])
    lists, source = load_lists(str(_datalist(tmp_path / "dl").parent), task)
    assert source.endswith("dataset_0.json") and [c.id for c in lists["validation"]] == ["img0008", "img0009"]


def test_plain_folder_errors_name_what_is_missing(tmp_path):
    task = resolve_task("btcv")
    root = _plain_folder(tmp_path / "half", ["img0001.nii.gz", "img0002.nii.gz"], ["label0001.nii.gz"])
    with pytest.raises(DataError, match=r"no label map in labelsTr/ for 1 image\(s\): img0002.nii.gz"):
        load_lists(str(root), task)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_lists(str(tmp_path / "empty"), task)
    msg = str(e.value)
    assert "no dataset_0.json or dataset.json and no images" in msg and "imagesTr/ + labelsTr/" in msg
    assert 'lists of {"image": ..., "label": ...}' in msg and "{{" not in msg
    one = _plain_folder(tmp_path / "one", ["img0001.nii.gz"], ["label0001.nii.gz"])
    with pytest.raises(DataError, match="only 1 labelled case"):
        load_lists(str(one), task)
    with pytest.raises(DataError, match="classification task needs a datalist"):
        load_lists(str(root), resolve_task("classification"))
    with pytest.raises(DataError, match="data not found"):
        load_lists(str(tmp_path / "nowhere"), task)


def _write_case(tmp_path, name, affine, label_ids=(1, 6), shape=(30, 28, 12), label_affine=None, label_shape=None):
    rng = np.random.default_rng(0)
    img = np.full(shape, -1000.0, np.float32)
    img[3:27, 3:25, 1:11] = 40 + rng.normal(0, 5, (24, 22, 10))
    lab = np.zeros(label_shape or shape, np.int16)
    lab[5:10, 5:10, 2:5] = label_ids[0]
    lab[15:22, 12:20, 4:9] = label_ids[1]
    nib.save(nib.Nifti1Image(img, affine), tmp_path / f"{name}_img.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine if label_affine is None else label_affine), tmp_path / f"{name}_lab.nii.gz")
    return Case(name, str(tmp_path / f"{name}_img.nii.gz"), str(tmp_path / f"{name}_lab.nii.gz"))


LPS = np.array([[-4.0, 0, 0, 50], [0, -4.5, 0, 40], [0, 0, 6.0, -30], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [np.diag([4.0, 4.5, 6.0, 1.0]), LPS], ids=["ras", "lps"])
def test_training_preprocessing_equals_the_inference_transforms(tmp_path, affine):
    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(32, 32, 16))
    case = _write_case(tmp_path, "c", affine)
    prepared = prepare_case(case, task)
    ref = inference_transforms(task)({"image": case.image})["image"]
    assert torch.equal(prepared.image, ref.as_tensor())
    assert np.allclose(prepared.affine, ref.affine.numpy(), atol=1e-5)
    assert prepared.spacing == pytest.approx((8.0, 8.0, 8.0))
    assert set(prepared.label.unique().tolist()) <= {0.0, 1.0, 6.0}
    assert float(prepared.image.min()) >= 0.0 and float(prepared.image.max()) <= 1.0


def test_bad_cases_name_the_file(tmp_path):
    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(32, 32, 16))
    bad_ids = _write_case(tmp_path, "ids", np.eye(4), label_ids=(1, 20))
    with pytest.raises(DataError, match=r"ids_lab.nii.gz: label ids \[20\] are not labels of task 'btcv'"):
        prepare_case(bad_ids, task)
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    mismatch = _write_case(tmp_path, "aff", np.eye(4), label_affine=shifted)
    with pytest.raises(DataError, match="aff_lab.nii.gz: label affine does not match"):
        prepare_case(mismatch, task)
    shape = _write_case(tmp_path, "shp", np.eye(4), label_shape=(30, 28, 10))
    with pytest.raises(DataError, match="shp_lab.nii.gz: label shape"):
        prepare_case(shape, task)
    missing = Case("gone", str(tmp_path / "gone.nii.gz"), str(tmp_path / "gone_lab.nii.gz"))
    with pytest.raises(DataError, match="gone.nii.gz: file not found"):
        prepare_case(missing, task)


def test_train_samples_are_deterministic_roi_sized_and_padded(tmp_path):
    # The image (after preprocessing ~ 15x14x10 voxels) is smaller than the ROI: padded, not refused.
    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(32, 32, 16))
    prepared = [prepare_case(_write_case(tmp_path, f"c{i}", np.diag([4.0, 4.0, 6.0, 1.0])), task) for i in range(2)]
    original = prepared[0].image.clone()
    store = case_store([p.source for p in prepared], prepared, task)
    view = store(0)
    assert tuple(view["image"].shape[1:]) == (32, 32, 16)  # padded up to the ROI once
    fg = view["label"].flatten()[torch.as_tensor(view["label_fg"])]
    assert len(fg) == int((view["label"] > 0).sum()) and bool((fg > 0).all())
    ds = TrainSamples(2, store, task, AugConfig(flip_prob=0.5, shift_prob=1.0), seed=3)
    a, b = ds[5], ds[5]
    assert a["image"].shape == (1, 32, 32, 16) and a["label"].shape == (1, 32, 32, 16)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(ds[4]["image"], ds[6]["image"])
    assert torch.equal(prepared[0].image, original)  # the cache is never modified
    assert sorted(ds.case_index(i) for i in range(2)) == [0, 1]  # an epoch visits every case once
    assert set(a["label"].unique().tolist()) <= {0.0, 1.0, 6.0}


def test_recipe_configs_load_and_fit_their_networks():
    from pathlib import Path

    from alice3d.finetune.models import network_spec
    from alice3d.finetune.train import resolve_task_config

    root = Path(__file__).resolve().parents[2] / "configs" / "finetune"
    files = sorted(root.glob("*.yaml"))
    assert {f.stem for f in files} >= {"btcv_unetr", "btcv_swin_unetr", "btcv_nnformer", "btcv_unetr_cpu"}
    for f in files:
        cfg = load_config(FinetuneConfig, f, ["data.data=/real/data"] if "cpu" not in f.stem else [])
        task = resolve_task_config(cfg)
        spec = network_spec(cfg.model, task)  # checks that the ROI fits the network
        assert spec["args"], f
    unetr = load_config(FinetuneConfig, root / "btcv_unetr.yaml")
    assert (unetr.train.lr, unetr.train.weight_decay, unetr.task.roi) == (1e-4, 1e-5, (96, 96, 96))
    assert load_config(FinetuneConfig, root / "btcv_swin_unetr.yaml").train.lr == 4e-4
    nnf = load_config(FinetuneConfig, root / "btcv_nnformer.yaml")
    assert (nnf.train.optimizer, nnf.train.momentum, nnf.optim.schedule, nnf.train.lr) == ("sgd", 0.99, "poly", 0.01)
    assert nnf.optim.nesterov


def test_class_balanced_crops_find_small_organs():
    from alice3d.finetune.transforms import CLASS_KEY, train_random_transforms, training_view

    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=(16, 16, 8))
    image = torch.full((1, 64, 64, 32), 0.5)
    label = torch.zeros((1, 64, 64, 32))
    label[0, 4:40, 4:60, 2:30] = 6  # a large liver: ~45% of the volume
    label[0, 56:58, 56:58, 28:30] = 1  # an 8-voxel spleen in a corner
    view = training_view(image, label, task)
    assert [len(i) for i in view[CLASS_KEY]][:2] == [int((label == 0).sum()), 8]
    assert len(view[CLASS_KEY]) == task.num_classes and len(view[CLASS_KEY][6]) == 36 * 56 * 28

    def spleen_share(crop: str) -> float:
        t = train_random_transforms(task, AugConfig(crop=crop, flip_prob=0.0, rot90_prob=0.0, shift_prob=0.0))
        t.set_random_state(seed=0)
        hits = 0
        for _ in range(300):
            out = t(dict(view))[0]
            assert tuple(out["label"].shape) == (1, 16, 16, 8)
            hits += bool((out["label"] == 1).any())
        return hits / 300

    # posneg: the centre is one of ~56k liver voxels or a background voxel; the spleen is hit only
    # by crops centred within 8 voxels of it. classes: background, spleen and liver (the classes
    # present) each 1/3 of the centres, so at least a third of the crops hold the spleen.
    with pytest.warns(UserWarning, match="no available indices of class"):
        assert spleen_share("classes") >= 0.3
    assert spleen_share("posneg") < 0.1
