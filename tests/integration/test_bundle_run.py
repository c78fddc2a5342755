"""Exported bundles run with MONAI alone: ``python -m monai.bundle run / verify_metadata /
verify_net_in_out`` in a subprocess where alice3d (and SimpleITK, scipy, yaml, tqdm) cannot be
imported and sockets cannot connect; the written segmentations have the input's shape and
affine (RAS and LPS inputs) and equal what ``alice3d-finetune predict`` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.cli.export import main as export_main
from alice3d.config import save_config
from alice3d.finetune.config import FinetuneConfig, ModelConfig
from alice3d.finetune.models import build_network, network_spec
from alice3d.finetune.objectives import SegmentationTask
from alice3d.finetune.predict import predict
from alice3d.finetune.tasks import resolve_task
from alice3d.train.checkpoint import atomic_save

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

# Importable in the test venv but not needed by a bundle; einops only for nnFormer bundles.
NOT_IN_A_MONAI_ENV = ("alice3d", "landmark", "SimpleITK", "scipy", "yaml", "tqdm")

SITECUSTOMIZE = '''
import socket
import sys

BLOCKED = set({blocked!r})


class _Blocked:
    """Import hook: packages a plain MONAI install does not have are not importable."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the bundle test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())


def _offline(*args, **kwargs):
    raise OSError("network access blocked by the bundle test")


socket.socket.connect = _offline
'''

# monai.bundle verify_metadata validates with jsonschema (a test dependency, not a bundle one).
needs_jsonschema = pytest.mark.skipif(find_spec("jsonschema") is None, reason="jsonschema is not installed")

RAS = np.array([[4.0, 0, 0, -80], [0, 4.5, 0, -70], [0, 0, 5.0, 10], [0, 0, 0, 1]])


def make_run(run: Path, model: str, roi: tuple[int, ...], **model_kw) -> Path:
    """best.pt of a random network (head scaled so many labels appear) + config.yaml."""
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
    atomic_save({"metadata": {"kind": "alice3d-best", **obj.metadata()}, "state_dict": obj.state_dict(), "step": 3,
                 "metrics": {}}, run / "best.pt")
    cfg = FinetuneConfig()
    cfg.task.spacing, cfg.task.roi, cfg.model = (8.0, 8.0, 8.0), roi, mc
    save_config(cfg, run / "config.yaml")
    return run


def _as_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with x and y reversed (LPS voxel order), same world positions."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """ct_ras.nii.gz and ct_lps.nii.gz: one body-like volume stored in two orientations."""
    d = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(0)
    img = np.full((44, 40, 20), -1000.0, np.float32)
    img[5:40, 4:36, 2:18] = rng.normal(30, 80, (35, 32, 16))
    nib.save(nib.Nifti1Image(img, RAS), d / "ct_ras.nii.gz")
    lps_img, lps_aff = _as_lps(img, RAS)
    nib.save(nib.Nifti1Image(lps_img, lps_aff), d / "ct_lps.nii.gz")
    assert nib.aff2axcodes(lps_aff) == ("L", "P", "S")
    return d


def _env(tmp: Path, blocked: tuple[str, ...]) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=tuple(blocked)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _python(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def unetr(tmp_path_factory):
    root = tmp_path_factory.mktemp("unetr")
    run = make_run(root / "run", "unetr", (32, 32, 16), hidden_size=48, mlp_dim=96, num_heads=4)
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(run), "--out", str(root / "bundle")])
    assert e.value.code == 0
    return run, root / "bundle"


def _check_against_input_and_predict(run: Path, image: Path, seg_path: Path, tmp: Path) -> np.ndarray:
    ref, seg = nib.load(image), nib.load(seg_path)
    assert seg.shape == ref.shape
    assert np.allclose(seg.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(ref.affine)
    data = np.asarray(seg.dataobj)
    assert data.dtype == np.uint8
    want = nib.load(predict(run, image, tmp / f"predict_{image.name}", device="cpu"))
    assert np.array_equal(data, np.asarray(want.dataobj))
    return data


def test_unetr_bundle_runs_without_alice3d(unetr, images, tmp_path):
    run, bundle = unetr
    env = _env(tmp_path, NOT_IN_A_MONAI_ENV)
    probe = _python(["-c", "import alice3d"], tmp_path, env)
    assert probe.returncode != 0 and "No module named 'alice3d'" in probe.stderr
    out = tmp_path / "out"
    _ok(_python(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
                 "--dataset_dir", str(images), "--output_dir", str(out), "--device", "cpu"], bundle, env))
    assert sorted(p.name for p in out.iterdir()) == ["ct_lps_seg.nii.gz", "ct_ras_seg.nii.gz"]
    ras = _check_against_input_and_predict(run, images / "ct_ras.nii.gz", out / "ct_ras_seg.nii.gz", tmp_path)
    lps = _check_against_input_and_predict(run, images / "ct_lps.nii.gz", out / "ct_lps_seg.nii.gz", tmp_path)
    assert len(np.unique(ras)) > 3  # a non-trivial label map
    assert np.array_equal(lps, ras[::-1, ::-1])  # same labels at the same world points


@needs_jsonschema
def test_verify_metadata_passes_offline(unetr, tmp_path):
    _, bundle = unetr
    log = _ok(_python(["-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
                       "--filepath", "docs/meta_schema.json"], bundle, _env(tmp_path, NOT_IN_A_MONAI_ENV)))
    assert "skipped downloading" in log and "metadata is verified with no error" in log


def test_verify_net_in_out_passes(unetr, tmp_path):
    _, bundle = unetr
    log = _ok(_python(["-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                       "--config_file", "configs/inference.json", "--device", "cpu"], bundle,
                      _env(tmp_path, NOT_IN_A_MONAI_ENV)))
    assert "data shape of network is verified with no error" in log


@pytest.mark.slow
@needs_jsonschema
def test_verify_metadata_rejects_a_broken_metadata_file(unetr, tmp_path):
    """The vendored schema has teeth: a metadata.json without 'authors' fails verification."""
    _, bundle = unetr
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    del meta["authors"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    proc = _python(["-m", "monai.bundle", "verify_metadata", "--meta_file", str(tmp_path / "metadata.json"),
                    "--filepath", str(bundle / "docs" / "meta_schema.json")], tmp_path,
                   _env(tmp_path, NOT_IN_A_MONAI_ENV))
    assert proc.returncode != 0 and "'authors' is a required property" in proc.stderr


def test_nnformer_bundle_ships_its_network_and_runs_without_alice3d_or_einops(images, tmp_path):
    from alice3d.encoders.nnformer import NNFormer
    from alice3d.finetune.predict import load_run

    run = make_run(tmp_path / "run", "nnformer", (32, 32, 16))
    bundle = tmp_path / "bundle"
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(run), "--out", str(bundle)])
    assert e.value.code == 0
    src = Path(__file__).resolve().parents[2] / "alice3d" / "encoders" / "nnformer.py"
    assert (bundle / "scripts" / "nnformer.py").read_bytes() == src.read_bytes()  # a verbatim copy
    net_def = dict(json.loads((bundle / "configs" / "inference.json").read_text())["network_def"])
    assert net_def.pop("_target_") == "scripts.nnformer.NNFormer" and net_def["deep_supervision"] is False
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert set(meta["required_packages_version"]) == {"nibabel", "fire"} and meta["alice3d"]["torchscript"] == "traced"
    sd = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "heads.0.weight" in sd and not any(k.startswith("heads.1.") for k in sd)  # only the full-res head
    net = NNFormer(**net_def).eval()
    net.load_state_dict(sd, strict=True)
    x = torch.rand(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_run(run, "cpu").network(x)
        assert torch.equal(net(x), want)
        assert torch.allclose(torch.jit.load(str(bundle / "models" / "model.ts"))(x), want, atol=1e-4)
    env = _env(tmp_path, (*NOT_IN_A_MONAI_ENV, "einops"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    image = images / "ct_lps.nii.gz"
    # Run from another folder: monai.bundle puts the bundle root on sys.path, so scripts/ imports.
    _ok(_python(["-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                 "--bundle_root", str(bundle), "--datalist", f"['{image}']", "--output_dir", str(out),
                 "--device", "cpu"], elsewhere, env))
    _check_against_input_and_predict(run, image, out / "ct_lps_seg.nii.gz", tmp_path)


@pytest.mark.slow
def test_swin_unetr_bundle_runs_without_alice3d(images, tmp_path):
    run = make_run(tmp_path / "run", "swin_unetr", (64, 32, 32), swin_depths=(1, 1, 1, 1), swin_window=4)
    bundle = tmp_path / "bundle"
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(run), "--out", str(bundle)])
    assert e.value.code == 0
    out = tmp_path / "out"
    _ok(_python(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
                 "--dataset_dir", str(images), "--output_dir", str(out), "--device", "cpu"], bundle,
                _env(tmp_path, NOT_IN_A_MONAI_ENV)))
    for name in ("ct_ras", "ct_lps"):
        _check_against_input_and_predict(run, images / f"{name}.nii.gz", out / f"{name}_seg.nii.gz", tmp_path)


@pytest.mark.slow
def test_bundle_without_inputs_says_what_to_pass(unetr, tmp_path):
    _, bundle = unetr
    (tmp_path / "nothing").mkdir()
    proc = _python(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
                    "--dataset_dir", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o")], bundle,
                   _env(tmp_path, NOT_IN_A_MONAI_ENV))
    assert proc.returncode != 0 and "no input images: pass --dataset_dir DIR" in proc.stderr


@pytest.mark.slow
def test_real_finetune_run_exports_and_runs(tmp_path):
    """alice3d-finetune (2 steps, nnFormer with deep supervision) -> alice3d-export -> bundle run
    on a phantom stored LPS, equal to predict; the README carries the run's real results."""
    from alice3d.cli.finetune import main as finetune_main
    from alice3d.data.phantom import generate_cohort

    cohort = generate_cohort(tmp_path / "phantoms", n=4, seed=0, size="tiny")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        finetune_main(["--task", "btcv", "--data-root", str(cohort), "--model", "nnformer", "--out", str(run),
                       "train.max_steps=2", "task.spacing=[12,12,12]", "task.roi=[32,32,16]", "train.batch_size=1",
                       "train.device=cpu", "eval.n_previews=0", "eval.sw_overlap=0.25"])
    assert e.value.code == 0
    bundle = tmp_path / "bundle"
    with pytest.raises(SystemExit) as e:
        export_main(["--run", str(run), "--out", str(bundle)])
    assert e.value.code == 0
    results = json.loads((run / "results.json").read_text())
    readme = (bundle / "docs" / "README.md").read_text()
    liver = results["metrics"]["per_organ"]["liver"]["dice"]["mean"]
    assert f"| liver | {100 * liver:.2f} |" in readme
    dl = json.loads((Path(cohort) / "dataset_0.json").read_text())
    image = next(Path(cohort) / e["image"] for e in dl["training"]
                 if nib.aff2axcodes(nib.load(Path(cohort) / e["image"]).affine)[:2] == ("L", "P"))
    out = tmp_path / "out"
    _ok(_python(["-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
                 "--datalist", f"['{image}']", "--output_dir", str(out), "--device", "cpu"], bundle,
                _env(tmp_path, (*NOT_IN_A_MONAI_ENV, "einops"))))
    _check_against_input_and_predict(run, image, out / image.name.replace(".nii.gz", "_seg.nii.gz"), tmp_path)
