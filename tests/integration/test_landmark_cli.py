"""alice3d-landmark end to end on a tiny phantom cohort: train, resume, match (+PNG), embed, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from landmark.cli import main

TINY = ["data.spacing=[8,8,8]", "crop.size=[32,32,16]", "model.stem_width=4", "model.widths=[8,8,8,8]",
        "model.fpn_dim=8", "model.embed_dim=16", "train.batch_size=2", "train.device=cpu", "train.ckpt_every=1",
        "loss.anchors=32", "loss.hard_pool=64", "loss.negatives=16", "loss.random_negatives=16",
        "loss.coarse_negatives=16", "train.num_workers=0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from alice3d.data.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("tiny"), n=3, seed=0, size="tiny", shape=(32, 32, 24),
                           spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lm"
    code = _main(["train", "--out", str(out), "--data", str(cohort), "train.max_steps=2", *TINY])
    assert code == 0
    return out


def _main(argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def _centre(path):
    from alice3d.data.io import load_volume

    v = load_volume(path)
    return v.voxel_to_world(np.array([(np.asarray(v.shape) - 1) / 2]))[0]


def test_train_writes_model_config_metrics_and_resumes(run, cohort, capsys):
    assert (run / "landmark.pt").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    assert all(np.isfinite(l["loss"]) and "loss_fine" in l and "loss_coarse" in l for l in lines)
    from alice3d.train.checkpoint import load_checkpoint

    meta = load_checkpoint(run / "landmark.pt")["metadata"]
    assert meta["kind"] == "alice3d-landmark" and meta["spacing"] == [8.0, 8.0, 8.0]
    assert meta["model"]["embed_dim"] == 16
    # a finished run refuses to be overwritten, and continues with --resume
    assert _main(["train", "--out", str(run), "--data", str(cohort), "train.max_steps=3", *TINY]) != 0
    assert _main(["train", "--out", str(run), "--data", str(cohort), "--resume", "train.max_steps=3", *TINY]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_match_prints_json_lines_and_png(run, cohort, tmp_path, capsys):
    a, b = cohort / "imagesTr" / "img0001.nii.gz", cohort / "imagesTr" / "img0002.nii.gz"
    c = _centre(a)
    pts = f"{c[0]:.2f},{c[1]:.2f},{c[2]:.2f};{c[0] + 8:.2f},{c[1]:.2f},{c[2] - 8:.2f}"
    png = tmp_path / "m.png"
    capsys.readouterr()
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(b),
                  "--points", pts, "--png", str(png), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    out = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(out) == 2
    assert out[0]["query"] == pytest.approx([round(v, 2) for v in c], abs=1e-6)
    from alice3d.data.io import load_volume

    vb = load_volume(b)
    ijk = vb.world_to_voxel(np.array([o["match"] for o in out]))
    assert ((ijk > -0.5) & (ijk < np.asarray(vb.shape) - 0.5)).all()  # matches lie inside B
    assert all(-1.0 <= o["score"] <= 1.0 for o in out)
    from alice3d.analysis.png import read_png

    img = read_png(png)
    assert img.ndim == 3 and img.shape[0] > 50
    # second run: embeddings come from the cache
    assert len(list((tmp_path / "cache").rglob("*.emb"))) == 2


@pytest.mark.parametrize("mode", ["affine", "none"])
def test_match_consistency_flag_selects_the_mode(run, cohort, tmp_path, capsys, mode):
    from landmark.match import Matcher

    a, b = cohort / "imagesTr" / "img0001.nii.gz", cohort / "imagesTr" / "img0002.nii.gz"
    c = _centre(a)
    capsys.readouterr()
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(b),
                  "--points", f"{c[0]},{c[1]},{c[2]}", "--consistency", mode, "--cache-dir", str(tmp_path)])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    m = Matcher(run / "landmark.pt", cache_dir=tmp_path, consistency=mode)
    want, score = m.match(a, b, np.array([c]))
    assert got["match"] == pytest.approx(want[0].tolist(), abs=1e-3)
    assert got["score"] == pytest.approx(float(score[0]), abs=1e-5)
    # the CLI fitted the pair's affine and left it in the cache, where the second matcher found it
    assert len(list(tmp_path.rglob("pairs/*.pair"))) == (1 if mode == "affine" else 0)
    assert m.stats["pair_transforms"] + m.stats["pair_fallbacks"] == 0


def test_match_errors_are_one_clear_line(run, cohort, tmp_path, capsys):
    a = cohort / "imagesTr" / "img0001.nii.gz"
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(a),
                  "--points", "9999,0,0", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "outside volume" in err and "Traceback" not in err
    code = _main(["match", "--model", str(run / "checkpoints" / "last.pt"), "--source", str(a), "--target", str(a),
                  "--points", "0,0,0", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "expected a file of kind 'alice3d-landmark'" in err
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(tmp_path / "missing.nii.gz"),
                  "--target", str(a), "--points", "0,0,0", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.nii.gz" in err


def test_embed_command_caches(run, cohort, tmp_path, capsys):
    imgs = [str(cohort / "imagesTr" / f"img000{i}.nii.gz") for i in (1, 2)]
    args = ["embed", "--model", str(run / "landmark.pt"), "--cache-dir", str(tmp_path), *imgs]
    assert _main(args) == 0
    out = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert len(out) == 2 and all(o["cache"] and o["fine_shape"] == [16, 16, 12] for o in out)
    assert len(list(tmp_path.rglob("*.emb"))) == 2


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "landmark.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train" in res.stdout and "match" in res.stdout
