"""``alice3d-finetune`` end to end on tiny phantoms: results.json with every organ, best.pt,
previews, predict in the input's space, bad cases reported, incompatible encoders refused."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.cli.finetune import main
from alice3d.data.phantom import generate_cohort
from alice3d.finetune.tasks import BTCV_LABELS

TINY = ["task.spacing=[12,12,12]", "task.roi=[32,32,16]", "model.hidden_size=48", "model.mlp_dim=96",
        "model.num_heads=4", "model.feature_size=12", "train.batch_size=1", "train.device=cpu",
        "eval.n_previews=1", "eval.sw_overlap=0.25"]


def _run(argv) -> int:
    """Exit status of ``alice3d-finetune argv`` run in this process."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    code = e.value.code
    return code if isinstance(code, int) else (0 if code is None else 1)  # SystemExit("message") exits 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 tiny phantoms (3 training, 1 validation), some stored LPS, in the BTCV layout."""
    return generate_cohort(tmp_path_factory.mktemp("phantoms"), n=4, seed=0, size="tiny")


@pytest.fixture(scope="module")
def finished_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "unetr"
    code = _run(["--task", "btcv", "--data-root", cohort, "--model", "unetr", "--out", out,
                 "train.max_steps=2", *TINY])
    assert code == 0
    return out


def test_finetune_writes_results_for_every_organ(finished_run):
    out = finished_run
    results = json.loads((out / "results.json").read_text())
    organs = [v for k, v in BTCV_LABELS.items() if k]
    assert list(results["metrics"]["per_organ"]) == organs
    assert results["n_cases"] == 1 and results["task"] == "btcv" and results["model"] == "unetr"
    (case,) = results["cases"].values()
    assert set(case["dice"]) == set(organs) and set(case["nsd"]) == set(organs)
    for organ in organs:
        d = results["metrics"]["per_organ"][organ]["dice"]["mean"]
        assert d is None or 0.0 <= d <= 1.0
    assert results["metrics"]["mean_dice"] is not None
    assert results["nsd_tolerance_mm"]["liver"] == 1.0
    md = (out / "results.md").read_text()
    assert "| liver |" in md and "| **mean** |" in md
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metadata"]["kind"] == "alice3d-best" and best["metadata"]["network"]["name"] == "unetr"
    assert best["step"] in (1, 2) and results["best_step"] == best["step"]
    assert list((out / "previews").glob("*.png"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_mean_dice" in r for r in logged) and any("loss" in r for r in logged)
    cfg = (out / "config.yaml").read_text()
    assert "roi:\n  - 32\n  - 32\n  - 16" in cfg and "name: unetr" in cfg


def test_predict_cli_writes_input_space_segmentation(finished_run, cohort, tmp_path):
    dl = json.loads((cohort / "dataset_0.json").read_text())
    images = [cohort / e["image"] for e in dl["training"][:2]]
    assert len({nib.aff2axcodes(nib.load(p).affine) for p in images}) == 2  # two storage orientations
    for entry in dl["training"][:2]:
        image = cohort / entry["image"]
        seg_path = tmp_path / f"{image.name}.seg.nii.gz"
        assert _run(["predict", "--run", finished_run, "--image", image, "--out", seg_path, "--device", "cpu"]) == 0
        ref, seg = nib.load(image), nib.load(seg_path)
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= set(BTCV_LABELS)


def _cohort_with_bad_label(cohort, tmp_path):
    root = tmp_path / "bad_cohort"
    shutil.copytree(cohort, root)
    dl = json.loads((root / "dataset_0.json").read_text())
    lab_path = root / dl["training"][0]["label"]
    lab = nib.load(lab_path)
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 42
    nib.save(nib.Nifti1Image(arr, lab.affine), lab_path)
    return root, lab_path.name


def test_bad_case_fails_or_is_reported(cohort, tmp_path, capsys):
    root, bad_name = _cohort_with_bad_label(cohort, tmp_path)
    code = _run(["--task", "btcv", "--data-root", root, "--out", tmp_path / "fail", "train.max_steps=1",
                 "data.on_bad_data=fail", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and bad_name in err and "label ids [42]" in err
    assert not (tmp_path / "fail" / "checkpoints").exists()
    out = tmp_path / "skip"
    assert _run(["--task", "btcv", "--data-root", root, "--out", out, "train.max_steps=1",
                 "data.on_bad_data=skip", *TINY, "eval.n_previews=0"]) == 0
    report = json.loads((out / "data_report.json").read_text())
    (bad_id,) = report["bad_training_cases"]
    assert "label ids [42]" in report["bad_training_cases"][bad_id]
    results = json.loads((out / "results.json").read_text())
    assert bad_id in results["bad_train_cases"] and bad_id not in results["train_cases"]


def test_incompatible_encoder_is_refused(cohort, tmp_path, capsys):
    from alice3d.encoders.files import save_encoder
    from alice3d.encoders.swin import SwinEncoder

    enc = SwinEncoder(feature_size=12)
    path = save_encoder(tmp_path / "encoder.pt", enc.state_dict(), {"arch": "swin", "arch_args": enc.config})
    code = _run(["--task", "btcv", "--data-root", cohort, "--model", "unetr", "--pretrained", path,
                 "--out", tmp_path / "run", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "encoder.pt" in err and "fits model 'swin_unetr', not model.name='unetr'" in err


@pytest.mark.slow
@pytest.mark.parametrize("model,roi", [("swin_unetr", "[64,32,32]"), ("nnformer", "[32,32,16]")])
def test_other_models_end_to_end(cohort, tmp_path, model, roi):
    out = tmp_path / model
    argv = ["--task", "btcv", "--data-root", cohort, "--model", model, "--out", out, "train.max_steps=2", *TINY,
            f"task.roi={roi}", "model.nnformer_preset=nnformer_tiny"]
    if model == "nnformer":
        argv += ["train.optimizer=sgd", "train.momentum=0.99", "optim.schedule=poly", "train.lr=0.01"]
    assert _run(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == model and len(results["metrics"]["per_organ"]) == 13


@pytest.mark.slow
def test_kfold_pools_every_case_once(cohort, tmp_path):
    out = tmp_path / "cv"
    assert _run(["--task", "btcv", "--data-root", cohort, "--kfold", "2", "--out", out, "train.max_steps=1", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kfold"] == 2 and results["n_cases"] == 4 and set(results["folds"]) == {"0", "1"}
    assert (out / "fold_0" / "best.pt").exists() and (out / "fold_1" / "results.json").exists()


def test_classification_task_reports_auc(cohort, tmp_path):
    dl = json.loads((cohort / "dataset_0.json").read_text())
    entries = [{"image": str(cohort / e["image"]), "label": i % 2} for i, e in enumerate(dl["training"] + dl["validation"])]
    datalist = tmp_path / "cls.json"
    datalist.write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    out = tmp_path / "cls"
    assert _run(["--task", "classification", "--data-root", datalist, "--model", "vit", "--out", out,
                 "train.max_steps=2", "train.batch_size=2", "train.device=cpu", "task.roi=[32,32,16]",
                 "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "classification" and results["n_cases"] == 2
    assert 0.0 <= results["metrics"]["auc"] <= 1.0 and set(results["cases"]) == {"img0003", "img0004"}
    assert "| AUC |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_resume_continues_the_run(cohort, tmp_path):
    out = tmp_path / "resume"
    args = ["--task", "btcv", "--data-root", cohort, "--out", out, *TINY, "train.ckpt_every=1", "eval.n_previews=0"]
    assert _run([*args, "train.max_steps=1"]) == 0
    assert _run([*args, "--resume", "train.max_steps=3"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == sorted(s for s in steps if s) and max(steps) == 3
    assert json.loads((out / "results.json").read_text())["train_steps"] == 3
    assert _run([*args, "train.max_steps=3"]) != 0  # a finished run is never overwritten without --resume


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_failed_starts_then_the_corrected_rerun_uses_the_same_out(cohort, tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "missing_cohort"
    shutil.copytree(cohort, missing)
    (missing / "imagesTr" / "img0002.nii.gz").unlink()
    assert _run(["--task", "btcv", "--data-root", missing, "--out", out, "train.max_steps=1",
                 "data.on_bad_data=fail", *TINY]) == 2
    assert "img0002.nii.gz" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # config.yaml is written only once the data checks passed
    # A k-fold start records its config before the folds; failing in fold 0 leaves that behind.
    bad, _ = _cohort_with_bad_label(cohort, tmp_path)
    assert _run(["--task", "btcv", "--data-root", bad, "--kfold", "2", "--out", out, "train.max_steps=1",
                 "data.on_bad_data=fail", *TINY]) == 2
    assert (out / "config.yaml").exists() and "kfold: 2" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert _run(["--task", "btcv", "--data-root", cohort, "--out", out, "train.max_steps=1", *TINY,
                 "eval.n_previews=0"]) == 0
    assert "reusing it for this run" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["train_steps"] == 1
    assert "kfold: 0" in (out / "config.yaml").read_text() and not (out / "fold_0").exists()


def test_a_finished_run_is_refused_and_left_untouched(finished_run, cohort):
    before = _snapshot(finished_run)
    assert "checkpoints/last.pt" in before and "best.pt" in before
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["--task", "btcv", "--data-root", cohort, "--out", finished_run, "train.max_steps=1", *TINY]])
    msg = str(e.value.code)  # SystemExit("error: ..."): Python prints it and exits 1
    assert f"{finished_run} is not empty: it holds a run (best.pt)" in msg and "--resume" in msg
    assert _snapshot(finished_run) == before


def test_plain_image_label_folder_without_datalist(cohort, tmp_path, capsys):
    plain = tmp_path / "plain"
    for sub in ("imagesTr", "labelsTr"):
        shutil.copytree(cohort / sub, plain / sub)
    assert not (plain / "dataset_0.json").exists()
    out = tmp_path / "run"
    assert _run(["--task", "btcv", "--data-root", plain, "--out", out, "train.max_steps=1", *TINY,
                 "eval.n_previews=0"]) == 0
    assert "validation = the last 1 in file-name order (img0004)" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["train_cases"] == ["img0001", "img0002", "img0003"] and results["val_cases"] == ["img0004"]


def test_encoder_reliance_reevaluates_the_run_and_swaps_only_the_encoder(finished_run, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "encoder_reliance.py"
    spec = importlib.util.spec_from_file_location("encoder_reliance", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    row = script.reliance(finished_run)
    results = json.loads((finished_run / "results.json").read_text())
    # As trained, it reproduces the run's own validation Dice (same cases, same sliding window).
    assert row["cases"] == 1 and row["encoder"] == "UNETR.vit"
    assert row["dice_trained"] == pytest.approx(100 * results["metrics"]["mean_dice"], abs=1e-6)
    assert 0.0 <= row["voxels_changed_pct"] <= 100.0
    # A "fresh" encoder equal to the trained one changes nothing: only the encoder is swapped.
    import copy

    trained = script.load_run(finished_run).network
    monkeypatch.setattr(script, "build_network", lambda spec: copy.deepcopy(trained))
    same = script.reliance(finished_run)
    assert same["voxels_changed_pct"] == 0.0 and same["dice_encoder_reinitialised"] == same["dice_trained"]
