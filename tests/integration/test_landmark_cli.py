"""alice3d-landmark end to end on a tiny phantom cohort: train, resume, match (+PNG), embed, errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from alice3d.cli.landmark import main

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
    from alice3d.viz.png import read_png

    img = read_png(png)
    assert img.ndim == 3 and img.shape[0] > 50
    # second run: embeddings come from the cache
    assert len(list((tmp_path / "cache").rglob("*.zarr"))) == 2


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
    assert len(list(tmp_path.rglob("*.zarr"))) == 2


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "alice3d.cli.landmark", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "train" in res.stdout and "match" in res.stdout


def _bounds(path):
    from alice3d.data.io import load_volume
    from landmark.match import world_bounds

    v = load_volume(path)
    return world_bounds(v.affine, v.shape)


def test_match_takes_negative_points_inline_and_from_files(run, cohort, tmp_path, capsys):
    a, b = cohort / "imagesTr" / "img0001.nii.gz", cohort / "imagesTr" / "img0002.nii.gz"
    lo, _ = _bounds(a)
    c = _centre(a)
    assert lo[0] < -20  # the phantom spans patient-left (negative x in RAS)
    pts = [[round(lo[0] / 2, 2), round(c[1], 2), round(c[2], 2)], [round(lo[0] / 3, 2), round(c[1] - 8, 2), round(c[2] - 8, 2)]]
    (tmp_path / "p.json").write_text(json.dumps({"points": pts}))
    (tmp_path / "p.txt").write_text("# x,y,z in mm\n" + "\n".join(",".join(str(v) for v in p) for p in pts) + "\n")
    common = ["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(b),
              "--cache-dir", str(tmp_path / "cache")]
    outputs = []
    for where in (["--points", ";".join(",".join(str(v) for v in p) for p in pts)],
                  ["--points-file", str(tmp_path / "p.json")], ["--points-file", str(tmp_path / "p.txt")]):
        capsys.readouterr()
        assert _main([*common, *where]) == 0
        outputs.append([json.loads(l) for l in capsys.readouterr().out.strip().splitlines()])
    assert [o["query"] for o in outputs[0]] == pts
    assert outputs[1] == outputs[0] and outputs[2] == outputs[0]


def test_points_outside_source_fail_before_any_embedding(run, cohort, tmp_path, capsys, monkeypatch):
    import landmark.preprocess

    def no_embedding(*a, **k):
        raise AssertionError("embedded a volume although the query point lies outside the source")

    monkeypatch.setattr(landmark.preprocess, "embed_volume", no_embedding)
    a, b = cohort / "imagesTr" / "img0001.nii.gz", cohort / "imagesTr" / "img0002.nii.gz"
    lo, hi = _bounds(a)
    cache = tmp_path / "cache"
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(b),
                  "--points", "-9999,0,0", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: 1 query point(s) outside volume " + str(a))
    assert f"world extent {np.round(lo, 1).tolist()} .. {np.round(hi, 1).tolist()} mm" in err
    assert err.strip().endswith("-9999.0,0.0,0.0") and "Traceback" not in err
    assert not cache.exists()


def test_bad_points_file_is_one_clear_line(run, cohort, tmp_path, capsys):
    a = cohort / "imagesTr" / "img0001.nii.gz"
    bad = tmp_path / "p.txt"
    bad.write_text("-10,150\n")
    code = _main(["match", "--model", str(run / "landmark.pt"), "--source", str(a), "--target", str(a),
                  "--points-file", str(bad), "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: --points-file {bad} line 1: expected 'x,y,z' in world mm, could not read '-10,150'\n"


def _cache_entries(root):
    import os

    from landmark.embed_cache import write_entry, write_group

    made = []
    for name, mtime in (("m1/aaaa.zarr", 1_600_000_000), ("m1/pairs/pppp.pair", 1_600_000_100),
                        ("m2/bbbb.zarr", 1_700_000_000)):
        write = write_entry if name.endswith(".pair") else write_group
        path = write(root / name, {"a": np.zeros(256, np.float32)}, {})
        os.utime(path, (mtime, mtime))
        made.append(path)
    (root / "keep.txt").write_text("not a cache entry")
    return made


def test_cache_info_reports_entries_size_cap_and_ages(tmp_path, capsys, monkeypatch):
    import time

    from landmark.embed_cache import entry_bytes

    made = _cache_entries(tmp_path)
    total = sum(entry_bytes(p) for p in made)
    monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", "5")
    capsys.readouterr()
    assert _main(["cache", "--info", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
    assert lines == [f"directory: {tmp_path}", "entries: 3 (2 embeddings, 1 pair maps)",
                     f"total: {total / 1e3:.2f} kB ({total} bytes)", "cap: 5.00 GB (set with ALICE3D_CACHE_MAX_GB)",
                     f"oldest: {stamp(1_600_000_000)}  {made[0]}", f"newest: {stamp(1_700_000_000)}  {made[2]}"]
    monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", "none")
    assert _main(["cache", "--info", "--cache-dir", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["entries: 0 (0 embeddings, 0 pair maps)", "total: 0 bytes (0 bytes)",
                                                        "cap: none (set with ALICE3D_CACHE_MAX_GB)"]
    monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", "lots")
    assert _main(["cache", "--info", "--cache-dir", str(tmp_path)]) == 2
    assert "error: ALICE3D_CACHE_MAX_GB='lots': expected a size in GB" in capsys.readouterr().err


def test_cache_clear_removes_only_entries(tmp_path, capsys):
    from landmark.embed_cache import entry_bytes

    made = _cache_entries(tmp_path)
    total = sum(entry_bytes(p) for p in made)
    capsys.readouterr()
    assert _main(["cache", "--clear", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"removed 3 cache entries ({total / 1e3:.2f} kB) from {tmp_path}\n"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.txt"]
    assert _main(["cache", "--cache-dir", str(tmp_path)]) == 2  # --info or --clear is required
