"""Probing frozen encoders: the organ-at-centre task, linear and attentive probes, encoder files, CLI."""

import json

import numpy as np
import pytest
import torch

from alice3d.analysis.probing import (
    ProbeTask,
    attentive_probe,
    encoder_from_file,
    linear_probe,
    organ_center_task,
    run_probes,
)
from alice3d.data.io import Volume, save_nifti
from alice3d.encoders.files import encoder_file_metadata, save_encoder
from alice3d.encoders.resnet import build_resnet
from alice3d.encoders.vit import ViTEncoder
from alice3d.train.checkpoint import atomic_save

CLASSES = {"liver": (6,), "spleen": (1,)}


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_volume(seed: int, shape=(40, 40, 24)) -> Volume:
    """Body (0.3) with a liver-like box (0.6, label 6) and a spleen-like box (0.9, label 1)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    lab = np.zeros(shape, np.int16)
    arr[4:36, 4:36, 2:22] = 0.3
    arr[6:18, 6:30, 4:20], lab[6:18, 6:30, 4:20] = 0.6, 6
    arr[24:34, 8:20, 6:18], lab[24:34, 8:20, 6:18] = 0.9, 1
    arr += rng.normal(0, 0.02, shape).astype(np.float32)
    return Volume(array=arr, affine=np.diag([3.0, 3.0, 3.0, 1.0]), label=lab)


def test_organ_center_task_labels_crops_by_their_centre_voxel():
    vols = [blob_volume(k) for k in range(4)]
    task = organ_center_task(vols, (8, 8, 8), classes=CLASSES, per_class=5, seed=0)
    assert task.class_names == ["liver", "spleen", "other"]
    assert task.images.shape == (60, 1, 8, 8, 8) and task.labels.shape == (60,)
    assert int(task.train.sum()) == 45  # 3 of 4 subjects train, the last one tests
    centre = task.images[:, 0, 4, 4, 4]
    expected = torch.tensor([0.6, 0.9, 0.3])[task.labels]
    assert float((centre - expected).abs().max()) < 0.15
    task2d = organ_center_task(vols, (8, 8), classes=CLASSES, per_class=5, axis=1, seed=0)
    assert task2d.images.shape == (60, 1, 8, 8)
    assert torch.equal(task2d.images[:, 0, 4, 4], task.images[:, 0, 4, 4, 4])  # same centres, one plane


def toy_task(n=120, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    tokens = torch.randn(n, 5, d, generator=g) * 0.3
    tokens[torch.arange(n), 0, labels] += 3.0  # the class shows in one token only
    train = torch.arange(n) < 90
    return tokens, ProbeTask(images=torch.zeros(n, 1, 4, 4), labels=labels, train=train, class_names=["a", "b", "c"])


def test_linear_and_attentive_probes_learn_separable_features():
    tokens, task = toy_task()
    lin = linear_probe(tokens, task)
    att = attentive_probe(tokens, task, steps=150, lr=3e-3)
    assert lin.test_acc > 0.95 and att.test_acc > 0.95
    assert lin.n_train == 90 and lin.n_test == 30 and set(lin.per_class_test_acc) == {"a", "b", "c"}
    # Random labels cannot be predicted on held-out data.
    shuffled = ProbeTask(task.images, task.labels[torch.randperm(120, generator=torch.Generator().manual_seed(1))],
                         task.train, task.class_names)
    assert linear_probe(torch.randn(120, 5, 6), shuffled).test_acc < 0.6


def test_run_probes_on_a_frozen_vit_and_resnet():
    vols = [blob_volume(k) for k in range(3)]
    task = organ_center_task(vols, (16, 16), classes=CLASSES, per_class=6, axis=2, seed=0)
    torch.manual_seed(0)
    vit = ViTEncoder((16, 16), 4, spatial_dims=2, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    res = run_probes(vit, task, steps=60)
    assert set(res) == {"linear", "attentive"}
    assert res["linear"].test_acc > 0.6  # intensities differ per class: even a random ViT separates them
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # frozen
    resnet = build_resnet("resnet18_tiny", spatial_dims=2, layers=[1, 1, 1, 1], widths=[8, 8, 8, 8])
    assert run_probes(resnet, task, kinds=("linear",))["linear"].n_test == 18
    with pytest.raises(ValueError, match="unknown probe kinds"):
        run_probes(vit, task, kinds=("knn",))


def test_encoder_files_round_trip(tmp_path):
    torch.manual_seed(0)
    vit = ViTEncoder((16, 16), 4, spatial_dims=2, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)
    meta = encoder_file_metadata({**vit.metadata(), "method": "mae"}, crop_size=[16, 16], spacing=[3.0, 3.0, 3.0])
    save_encoder(tmp_path / "vit.pt", vit.state_dict(), meta)
    enc, m = encoder_from_file(tmp_path / "vit.pt")
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(enc(x), vit.eval()(x))
    assert m["method"] == "mae" and not any(p.requires_grad for p in enc.parameters())
    resnet = build_resnet("resnet18_tiny", spatial_dims=3)
    rmeta = encoder_file_metadata({**resnet.metadata(), "method": "convmim"}, crop_size=[32, 32, 32])
    # written directly: the shared save_encoder does not list the resnet arch
    atomic_save({"state_dict": resnet.state_dict(), "metadata": {**rmeta, "kind": "alice3d-encoder"}}, tmp_path / "r.pt")
    enc, _ = encoder_from_file(tmp_path / "r.pt")
    y = torch.rand(2, 1, 32, 32, 32)
    torch.testing.assert_close(enc(y)[-1], resnet.eval()(y)[-1])


def test_analyze_cli_probe_and_cka(tmp_path):
    from alice3d.cli.analyze import main

    root = tmp_path / "data"
    entries = []
    for k in range(3):
        v = blob_volume(k)
        save_nifti(v.array * 380 - 125, v.affine, root / "imagesTr" / f"img{k:04d}.nii.gz")
        save_nifti(v.label, v.affine, root / "labelsTr" / f"label{k:04d}.nii.gz", dtype=np.int16)
        entries.append({"image": f"imagesTr/img{k:04d}.nii.gz", "label": f"labelsTr/label{k:04d}.nii.gz"})
    (root / "dataset_0.json").write_text(json.dumps({"training": entries}))
    torch.manual_seed(0)
    vit = ViTEncoder((16, 16, 16), 8, spatial_dims=3, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2)
    meta = encoder_file_metadata({**vit.metadata(), "method": "mae"}, crop_size=[16, 16, 16], spacing=[3.0, 3.0, 3.0],
                                 hu_window=[-125.0, 255.0])
    save_encoder(tmp_path / "encoder.pt", vit.state_dict(), meta)
    common = ["--encoder", str(tmp_path / "encoder.pt"), "--data", str(root / "dataset_0.json"), "--per-class", "4"]
    with pytest.raises(SystemExit) as e:
        main(["probe", *common, "--out", str(tmp_path / "eval"), "--steps", "30"])
    assert e.value.code == 0
    out = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert {"linear", "attentive"} <= set(out) and 0.0 <= out["linear"]["test_acc"] <= 1.0
    assert out["classes"][-1] == "other"
    with pytest.raises(SystemExit) as e:
        main(["cka", *common, "--out", str(tmp_path / "eval"), "--ratios", "0.25,0.75", "--n", "24"])
    assert e.value.code == 0
    lines = (tmp_path / "eval" / "cka.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 and (tmp_path / "eval" / "cka.png").stat().st_size > 1000
