"""``alice3d-finetune evaluate``: a run's best.pt scored on the held-out split of a datalist."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from alice3d.data.io import DataError
from alice3d.finetune.held_out import evaluate_run
from alice3d.finetune.predict import predict
from helpers import write_tiny_best_run

# Already RAS at the task spacing and body everywhere: the task grid is the file's own grid,
# so a label map written in the file's space is scored voxel for voxel.
AFFINE = np.diag([8.0, 8.0, 8.0, 1.0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_best_run(tmp_path_factory.mktemp("run"), step=7)


def _write_case(folder, name, seed):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(30, 60, (36, 32, 18)), -150, 400).astype(np.float32)
    nib.save(nib.Nifti1Image(img, AFFINE), folder / f"{name}.nii.gz")
    return folder / f"{name}.nii.gz"


def test_held_out_split_is_scored_with_partial_labels(run_dir, tmp_path):
    cases = {}
    for i, name in enumerate(["t1", "t2", "v1", "v2"]):
        image = _write_case(tmp_path, name, i)
        seg = predict(run_dir, image, tmp_path / f"{name}_pred.nii.gz", device="cpu")
        pred = np.asarray(nib.load(seg).dataobj).astype(np.uint8)
        cases[name] = pred
        nib.save(nib.Nifti1Image(pred, AFFINE), tmp_path / f"{name}_label.nii.gz")
    present = sorted(set(np.unique(cases["t2"])) - {0})
    assert len(present) >= 2
    keep = int(present[0])
    # t2 contours one organ only: its label map holds that organ, the rest is unknown (drawn as 0).
    nib.save(nib.Nifti1Image(np.where(cases["t2"] == keep, keep, 0).astype(np.uint8), AFFINE), tmp_path / "t2_label.nii.gz")
    datalist = {
        "labels": {str(k): v for k, v in enumerate(["background", *[f"organ{j}" for j in range(1, 14)]])},
        "training": [{"image": "v1.nii.gz", "label": "v1_label.nii.gz"}],
        "validation": [{"image": "v2.nii.gz", "label": "v2_label.nii.gz"}],
        # t1: the network's own prediction, every organ contoured -> Dice 1 where present, NaN where
        # absent from both; t2: only `keep` contoured -> every other organ unknown there.
        "test": [{"image": "t1.nii.gz", "label": "t1_label.nii.gz"},
                 {"image": "t2.nii.gz", "label": "t2_label.nii.gz", "contoured": [keep]}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    res = evaluate_run(run_dir, tmp_path / "dataset.json", device="cpu")
    assert res["split"] == "test" and sorted(res["cases"]) == ["t1", "t2"]
    names = res["labels"]
    t1, t2 = res["cases"]["t1"], res["cases"]["t2"]
    for organ_id in range(1, 14):
        name = names[str(organ_id)]
        d1 = t1["dice"][name]
        if organ_id in set(np.unique(cases["t1"])):
            assert d1 == pytest.approx(1.0)
        else:
            assert d1 is None or math.isnan(d1)
        d2 = t2["dice"][name]
        if organ_id == keep:
            assert d2 == pytest.approx(1.0)
        else:
            assert d2 is None or math.isnan(d2)
    assert res["metrics"]["mean_dice"] == pytest.approx(1.0)
    written = json.loads((run_dir / "test_results.json").read_text())
    assert written["n_cases"] == 2 and written["checkpoint_step"] in (7, None)
    assert (run_dir / "test_results.md").read_text().count("Test cases:") == 1


def test_held_out_errors_name_the_split_and_the_file(run_dir, tmp_path):
    _write_case(tmp_path, "a", 0)
    nib.save(nib.Nifti1Image(np.zeros((36, 32, 18), np.uint8), AFFINE), tmp_path / "a_label.nii.gz")
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_label.nii.gz"}]}))
    with pytest.raises(DataError, match="d.json: no labelled 'test' cases"):
        evaluate_run(run_dir, tmp_path / "d.json", device="cpu")
    proc = subprocess.run([sys.executable, "-m", "alice3d.cli.finetune", "evaluate", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--split" in proc.stdout
