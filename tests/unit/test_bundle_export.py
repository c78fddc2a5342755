"""``alice3d-export``: bundle contents for UNETR / Swin UNETR / nnFormer runs, weights that load
strictly into the network inference.json builds, TorchScript equal to it, metadata and README
carrying the run's task and results, and clear refusals of bad input."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from alice3d.bundle.errors import ExportError
from alice3d.bundle.export import export_bundle
from alice3d.bundle.metadata import BundleInfo
from alice3d.cli.export import main
from alice3d.config import save_config
from alice3d.finetune.config import FinetuneConfig, ModelConfig
from alice3d.finetune.models import build_network, network_spec
from alice3d.finetune.objectives import SegmentationTask
from alice3d.finetune.tasks import BTCV_LABELS, resolve_task
from alice3d.train.checkpoint import atomic_save

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

RESULTS_DICE = {"spleen": 0.9123, "liver": 0.8456}


def make_run(run: Path, model: str, roi: tuple[int, ...], **model_kw) -> Path:
    """A fine-tuning run directory as alice3d-finetune leaves it: best.pt (random network whose
    head is scaled up so many labels appear), config.yaml and results.json."""
    run.mkdir(parents=True, exist_ok=True)
    task = resolve_task("btcv", spacing=(8.0, 8.0, 8.0), roi=roi)
    mc = ModelConfig(name=model, **model_kw)
    spec = network_spec(mc, task)
    torch.manual_seed(0)
    net = build_network(spec)
    head = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    with torch.no_grad():
        head.weight.mul_(20.0)
    inference = {"sw_batch_size": 2, "sw_overlap": 0.25, "sw_mode": "gaussian"}
    obj = SegmentationTask(net, spec, task,
                           extra_metadata={"model_name": model, "pretrained": "", "inference": inference})
    atomic_save({"metadata": {"kind": "alice3d-best", **obj.metadata()}, "state_dict": obj.state_dict(), "step": 7,
                 "metrics": {"mean_dice": 0.5}}, run / "best.pt")
    cfg = FinetuneConfig()
    cfg.task.spacing, cfg.task.roi, cfg.model = (8.0, 8.0, 8.0), roi, mc
    save_config(cfg, run / "config.yaml")
    organs = [v for k, v in BTCV_LABELS.items() if k]
    per = {o: {"dice": {"mean": RESULTS_DICE.get(o, 0.25), "std": 0.0, "n": 1},
               "nsd": {"mean": 0.5, "std": 0.0, "n": 1}} for o in organs}
    per["gallbladder"]["dice"]["mean"] = None  # absent from every validation case
    (run / "results.json").write_text(json.dumps({
        "kind": "segmentation", "task": "btcv", "model": model, "n_train_cases": 3, "n_cases": 1,
        "nsd_tolerance_mm": {o: 1.0 for o in organs},
        "metrics": {"mean_dice": 0.3141, "mean_nsd": 0.5, "per_organ": per}}))
    return run


@pytest.fixture(scope="module")
def unetr_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("unetr")
    run = make_run(root / "run", "unetr", (32, 32, 16), hidden_size=48, mlp_dim=96, num_heads=4)
    result = export_bundle(run, root / "bundle")
    return run, root / "bundle", result


def _network_from_config(bundle: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    return parser.get_parsed_content("network_def")


def _run_network(run: Path) -> torch.nn.Module:
    from alice3d.finetune.predict import load_run

    return load_run(run, "cpu").network


def _x(roi) -> torch.Tensor:
    return torch.rand(1, 1, *roi, generator=torch.Generator().manual_seed(1))


def test_unetr_bundle_files_metadata_and_weights(unetr_bundle):
    run, bundle, result = unetr_bundle
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
              "docs/README.md", "docs/meta_schema.json", "LICENSE"):
        assert (bundle / f).is_file(), f
    assert not (bundle / "scripts").exists()  # UNETR comes from monai.networks.nets
    assert result.torchscript == "scripted"
    assert result.metadata_validated == (find_spec("jsonschema") is not None)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    import monai
    import numpy

    assert meta["monai_version"] == monai.__version__ and meta["numpy_version"] == numpy.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert set(meta["required_packages_version"]) == {"nibabel", "fire", "einops"}  # MONAI's ViT needs einops
    assert "optional_packages_version" not in meta
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == [32, 32, 16] and fmt["inputs"]["image"]["num_channels"] == 1
    assert fmt["outputs"]["pred"]["num_channels"] == 14
    assert fmt["outputs"]["pred"]["channel_def"] == {str(k): v for k, v in BTCV_LABELS.items()}
    assert meta["eval_metrics"]["per_organ_dice"]["spleen"] == pytest.approx(0.9123)
    assert meta["eval_metrics"]["per_organ_dice"]["gallbladder"] is None
    assert meta["alice3d"]["best_step"] == 7

    # models/model.pt loads strictly into the network inference.json builds, and equals the run's network.
    net = _network_from_config(bundle)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    x = _x((32, 32, 16))
    with torch.no_grad():
        want = _run_network(run)(x)
        assert torch.equal(net.eval()(x), want)
        ts = torch.jit.load(str(bundle / "models" / "model.ts"))
        assert torch.allclose(ts(x), want, atol=1e-5)


def test_readme_and_license_carry_the_run(unetr_bundle):
    _, bundle, _ = unetr_bundle
    text = (bundle / "docs" / "README.md").read_text()
    assert "| spleen | 91.23 | 50.00 | 1.0 |" in text and "| liver | 84.56 |" in text
    assert "| gallbladder | n/a |" in text and "**31.41**" in text
    assert "| 13 | left_adrenal_gland |" in text
    assert "resample to 8 x 8 x 8 mm" in text and "HU window [-175, 250]" in text
    assert "ROI [32, 32, 16]" in text and "python -m monai.bundle run --config_file configs/inference.json" in text
    assert "phantoms" in text and "3 training, 1 validation" in text
    license_text = (bundle / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text


def test_bundle_preprocessing_equals_finetune_inference_transforms(unetr_bundle, tmp_path):
    """The config's preprocessing gives the same array and affine as the list predict uses."""
    import nibabel as nib
    import numpy as np

    from alice3d.finetune.transforms import inference_transforms

    run, bundle, _ = unetr_bundle
    rng = np.random.default_rng(0)
    img = np.full((30, 26, 12), -1000.0, np.float32)
    img[3:27, 4:22, 2:10] = rng.normal(40, 80, (24, 18, 8))
    affine = np.array([[-3.0, 0, 0, 40], [0, -3.5, 0, 20], [0, 0, 5.0, -30], [0, 0, 0, 1]])  # LPS storage
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "ct.nii.gz")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    ours = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "ct.nii.gz")})["image"]
    task = _run_network_task(run)
    theirs = inference_transforms(task)({"image": str(tmp_path / "ct.nii.gz")})["image"]
    assert ours.shape == theirs.shape and torch.equal(ours.as_tensor(), theirs.as_tensor())
    assert torch.equal(ours.affine, theirs.affine)
    assert [op["class"] for op in ours.applied_operations] == [op["class"] for op in theirs.applied_operations]


def _run_network_task(run: Path):
    from alice3d.finetune.predict import load_run

    return load_run(run, "cpu").task


def test_swin_unetr_bundle_is_traced_at_the_roi(tmp_path):
    run = make_run(tmp_path / "run", "swin_unetr", (64, 32, 32), swin_depths=(1, 1, 1, 1), swin_window=4)
    result = export_bundle(run, tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    assert result.torchscript == "traced"  # SwinUNETR cannot be scripted
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["alice3d"]["torchscript_input_shape"] == [1, 1, 64, 32, 32]
    assert "traced at input shape [1, 1, 64, 32, 32]" in (bundle / "docs" / "README.md").read_text()
    net = _network_from_config(bundle)
    assert type(net).__name__ == "SwinUNETR"
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    run_net = _run_network(run)
    assert all(torch.equal(v, run_net.state_dict()[k]) for k, v in net.state_dict().items())
    x = _x((64, 32, 32))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(bundle / "models" / "model.ts"))(x), run_net(x), atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_refuses_runs_that_are_not_finetuning_runs(tmp_path):
    with pytest.raises(ExportError, match="no such directory"):
        export_bundle(tmp_path / "missing", tmp_path / "b")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no best.pt"):
        export_bundle(empty, tmp_path / "b")
    pre = tmp_path / "pretrain"
    pre.mkdir()
    atomic_save({"state_dict": {}, "metadata": {"kind": "alice3d-encoder"}}, pre / "encoder.pt")
    with pytest.raises(ExportError, match="is a pretraining run .*encoder.pt.*alice3d-finetune --pretrained"):
        export_bundle(pre, tmp_path / "b")
    # A pretraining run whose trainer also kept a best.pt: its metadata has no task/network.
    atomic_save({"metadata": {"kind": "alice3d-best"}, "state_dict": {}, "step": 1}, pre / "best.pt")
    with pytest.raises(ExportError, match="a pretraining run's checkpoint"):
        export_bundle(pre, tmp_path / "b")
    cls = tmp_path / "classification"
    task = resolve_task("classification")
    atomic_save({"metadata": {"kind": "alice3d-best", "task": task.to_dict(), "network": {"name": "classifier"}},
                 "state_dict": {}, "step": 1}, cls / "best.pt")
    with pytest.raises(ExportError, match="classification run; alice3d-export writes segmentation bundles only"):
        export_bundle(cls, tmp_path / "b")
    kfold = tmp_path / "kfold"
    (kfold / "fold_0").mkdir(parents=True)
    (kfold / "fold_0" / "best.pt").write_bytes(b"")
    with pytest.raises(ExportError, match="k-fold run .*--run .*fold_0"):
        export_bundle(kfold, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_refuses_non_empty_output_without_force(unetr_bundle, tmp_path):
    run, _, _ = unetr_bundle
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "models").mkdir()
    (out / "models" / "stale.bin").write_text("old")
    with pytest.raises(ExportError, match="is not empty.*--force"):
        export_bundle(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["models", "notes.txt"]
    with pytest.raises(ExportError, match="would contain the run directory"):
        export_bundle(run, run.parent, force=True)
    with pytest.raises(ExportError, match="MAJOR.MINOR.PATCH"):
        export_bundle(run, tmp_path / "v", info=BundleInfo(version="1.0"))


@pytest.mark.slow
def test_force_replaces_only_bundle_files(unetr_bundle, tmp_path):
    run, _, _ = unetr_bundle
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "stale.bin").write_text("old")
    (out / "notes.txt").write_text("mine")
    export_bundle(run, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert not (out / "models" / "stale.bin").exists()  # a stale file of an earlier bundle: gone
    assert (out / "models" / "model.pt").is_file()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--run", str(tmp_path / "run"), "--out", str(tmp_path / "b")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no best.pt" in err and "Traceback" not in err
