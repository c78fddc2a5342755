"""Custom tasks: label names from a Decathlon dataset.json, and a task geometry sized to the device."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.config import ConfigError, load_config
from alice3d.data.io import DataError
from alice3d.finetune.config import FinetuneConfig
from alice3d.finetune.data import datalist_labels, device_type, task_from_config
from alice3d.finetune.train import resolve_task_config

HN_LABELS = {"0": "background", "1": "Brainstem", "2": "Parotid_L", "3": "Parotid_R"}
GPU = ((1.5, 1.5, 2.0), (96, 96, 96))
CPU = ((3.0, 3.0, 4.0), (64, 64, 32))


def _write_dataset(root, labels=HN_LABELS, n=3, name="dataset.json"):
    """``n`` tiny head-and-neck-like cases (2 mm voxels, 24 x 24 x 12) in the Decathlon layout."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        img = np.full((24, 24, 12), -1000.0, np.float32)
        img[2:22, 2:22, 1:11] = 40 + rng.normal(0, 5, (20, 20, 10))
        lab = np.zeros((24, 24, 12), np.int16)
        lab[10:14, 4:10, 3:9] = 1  # brainstem, midline
        lab[2:6, 12:18, 4:8] = 2  # left parotid: low x (RAS)
        lab[18:22, 12:18, 4:8] = 3  # right parotid: high x
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(img, aff), root / "imagesTr" / f"hn{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), root / "labelsTr" / f"hn{i:03d}.nii.gz")
        entries.append({"image": f"imagesTr/hn{i:03d}.nii.gz", "label": f"labelsTr/hn{i:03d}.nii.gz"})
    doc = {"name": "HN", "modality": {"0": "CT"}, "training": entries[:-1], "validation": entries[-1:]}
    if labels is not None:
        doc["labels"] = labels
    (root / name).write_text(json.dumps(doc))
    return root


def _cfg(*overrides):
    return load_config(FinetuneConfig, None, list(overrides))


def test_datalist_labels_field_is_read_and_checked(tmp_path):
    root = _write_dataset(tmp_path / "hn", n=2)
    assert datalist_labels(root / "dataset.json") == {0: "background", 1: "Brainstem", 2: "Parotid_L",
                                                      3: "Parotid_R"}
    none = _write_dataset(tmp_path / "none", labels=None, n=2)
    assert datalist_labels(none / "dataset.json") is None
    gap = _write_dataset(tmp_path / "gap", labels={"0": "background", "1": "a", "3": "c"}, n=2)
    with pytest.raises(DataError, match=r"gap/dataset.json: 'labels' ids \[0, 1, 3\] are not 0..K without gaps"):
        datalist_labels(gap / "dataset.json")
    word = _write_dataset(tmp_path / "word", labels={"0": "background", "one": "a"}, n=2)
    with pytest.raises(DataError, match="'labels' key 'one' is not a label id"):
        datalist_labels(word / "dataset.json")


def test_custom_task_takes_its_classes_from_the_datalist(tmp_path, caplog):
    root = _write_dataset(tmp_path / "hn", n=2)
    caplog.set_level(logging.INFO, logger="alice3d.finetune")
    cfg = _cfg("task.name=custom", f"data.data={root}", "train.device=cpu")
    task = task_from_config(cfg)
    assert task.labels == {0: "background", 1: "Brainstem", 2: "Parotid_L", 3: "Parotid_R"}
    assert task.num_classes == 4 and task.lateral_pairs == ((3, 2),)  # Parotid_R <-> Parotid_L from the names
    assert cfg.task.labels == ["Brainstem", "Parotid_L", "Parotid_R"] and cfg.task.lateral_pairs == [[3, 2]]
    assert any("4 classes from the 'labels' of" in r.getMessage() for r in caplog.records)
    # Explicit task.labels win: same names (any case) are fine; other names are an error naming both.
    agree = task_from_config(_cfg("task.name=custom", f"data.data={root}", "task.labels=[brainstem,parotid_l,parotid_r]"))
    assert agree.labels[1] == "brainstem"
    with pytest.raises(ConfigError) as e:
        task_from_config(_cfg("task.name=custom", f"data.data={root}", "task.labels=[Brainstem,Parotid_R,Parotid_L]"))
    msg = str(e.value)
    assert "task.labels ['Brainstem', 'Parotid_R', 'Parotid_L']" in msg and str(root / "dataset.json") in msg
    assert "2=Parotid_L" in msg
    # No labels anywhere: the error says both ways of giving them.
    bare = _write_dataset(tmp_path / "bare", labels=None, n=2)
    with pytest.raises(ConfigError, match=r"needs task.labels, .* or a Decathlon 'labels' field in the datalist"):
        task_from_config(_cfg("task.name=custom", f"data.data={bare}"))
    assert task_from_config(_cfg("task.name=custom", f"data.data={bare}", "task.labels=[a,b]")).num_classes == 3
    # Explicit lateral pairs win over the ones found in the names.
    assert task_from_config(_cfg("task.name=custom", f"data.data={root}", "task.lateral_pairs=[]")).lateral_pairs == ()
    # Presets keep their own labels whatever the datalist says (BTCV's dataset_0.json abbreviates them).
    btcv = task_from_config(_cfg("task.name=btcv", f"data.data={root}"))
    assert btcv.num_classes == 14 and btcv.lateral_pairs == ((2, 3), (12, 13))


@pytest.mark.parametrize("cuda", [False, True], ids=["no-cuda", "cuda"])
def test_default_geometry_follows_the_device_and_explicit_settings_win(tmp_path, monkeypatch, caplog, cuda):
    root = _write_dataset(tmp_path / "hn", n=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    caplog.set_level(logging.INFO, logger="alice3d.finetune")
    assert device_type("auto") == ("cuda" if cuda else "cpu")
    assert (device_type("cpu"), device_type("cuda:1")) == ("cpu", "cuda")

    def geometry(*overrides):
        cfg = _cfg("task.name=custom", f"data.data={root}", *overrides)
        task = task_from_config(cfg)
        assert (cfg.task.spacing, cfg.task.roi) == (task.spacing, task.roi)  # config.yaml records what is used
        return task.spacing, task.roi

    assert geometry("train.device=auto") == (GPU if cuda else CPU)
    assert geometry("train.device=cpu") == CPU
    assert geometry("train.device=cuda") == GPU
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "training on the CPU (train.device resolves to cpu): CPU-sized default geometry" in logged
    assert "training on CUDA: the task's GPU geometry" in logged
    # Explicit settings win, each on its own.
    assert geometry("train.device=cpu", "task.spacing=[1.0,1.0,1.0]") == ((1.0, 1.0, 1.0), CPU[1])
    assert geometry("train.device=cpu", "task.roi=[96,96,96]") == (CPU[0], (96, 96, 96))
    assert geometry("train.device=cuda", "task.spacing=[2,2,2]", "task.roi=[32,32,32]") == ((2.0, 2.0, 2.0),
                                                                                            (32, 32, 32))
    assert "task.spacing and task.roi as set" in " ".join(r.getMessage() for r in caplog.records)
    # The presets follow the same rule on real data; the phantom cohort is CPU-sized on any device.
    btcv = resolve_task_config(_cfg("task.name=btcv", "data.data=/real/data", "train.device=cpu"))
    assert (btcv.spacing, btcv.roi) == CPU
    assert (lambda t: (t.spacing, t.roi))(resolve_task_config(_cfg("task.name=btcv", "train.device=cuda"))) == CPU


def test_custom_task_end_to_end_reports_the_datalist_classes(tmp_path):
    from alice3d.cli.finetune import main

    root = _write_dataset(tmp_path / "hn", n=3)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["--task", "custom", "--data-root", str(root), "--model", "unetr", "--out", str(out),
              "train.max_steps=1", "train.batch_size=1", "train.device=cpu", "task.spacing=[4,4,4]",
              "task.roi=[32,32,16]", "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=4",
              "model.feature_size=12", "eval.n_previews=0", "eval.sw_overlap=0.25"])
    assert e.value.code in (0, None)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "custom" and results["labels"] == HN_LABELS
    assert list(results["metrics"]["per_organ"]) == ["Brainstem", "Parotid_L", "Parotid_R"]
    (case,) = results["cases"].values()
    assert set(case["dice"]) == {"Brainstem", "Parotid_L", "Parotid_R"}
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metadata"]["network"]["args"]["out_channels"] == 4
    assert best["metadata"]["task"]["lateral_pairs"] == [[3, 2]]
    saved = load_config(FinetuneConfig, out / "config.yaml")
    assert saved.task.labels == ["Brainstem", "Parotid_L", "Parotid_R"] and saved.task.lateral_pairs == [[3, 2]]
