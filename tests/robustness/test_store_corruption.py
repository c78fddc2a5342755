"""A damaged volume store through the pretraining CLI (issue A): a cut or deleted shard is found
at start by its size, a flipped byte inside a whole shard by its checksum when a crop reads it;
``skip`` quarantines the case and goes on, ``fail`` stops with one clean line and a checkpoint of
the last completed step, and the run folder can always be continued or reused."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from faults import PRETRAIN, checkpoint_step, metrics, step_losses

from alice3d.data import crops
from alice3d.data import preprocess as pre
from alice3d.data import store as store_mod
from alice3d.data.store import StoreSettings, body_hu_of_window, open_store
from landmark.pairs import PairDataset, PairSampler
from zarr.core.sync import _get_loop

WINDOW = (-125.0, 255.0)


@pytest.fixture(autouse=True)
def fresh_quarantine():
    """The quarantine is per process; in-process runs of different tests must not share it."""
    crops._QUARANTINED.clear()
    yield
    crops._QUARANTINED.clear()


@pytest.fixture(scope="module")
def clean_store(cohort, tmp_path_factory) -> Path:
    """The 4 phantoms of the cohort as a store at the tiny runs' 8 mm (one 64^3 chunk per case)."""
    out = tmp_path_factory.mktemp("store") / "store"
    paths = sorted(str(p) for p in (cohort / "imagesTr").glob("*.nii.gz"))
    pre.build_store(paths, out, StoreSettings((8.0, 8.0, 8.0), body_hu_of_window(WINDOW)), workers=1,
                    progress=False)
    return out


def _copy(clean_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_store, tmp_path / "store"))


def _shard(store: Path, index: int) -> tuple[str, Path]:
    """(case name, image shard file) of the store's case ``index`` (the run's volume ``index``)."""
    name = open_store(store).cases[index]["name"]
    return name, store / "cases" / name / "image" / "c" / "0" / "0" / "0"


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 8] = bytes(b ^ 0xFF for b in data[mid: mid + 8])  # same size, damaged chunk bytes
    path.write_bytes(bytes(data))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _no_noise(err: str) -> None:
    for noise in ("Traceback", "Task exception was never retrieved", "Task was destroyed", "asyncio",
                  "Caught StoreError", "Original Traceback"):
        assert noise not in err, f"{noise!r} in the output:\n{err[-3000:]}"


# ----------------------------------------------------------------------------- at start: stats


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_cut_or_deleted_shard_is_a_bad_volume_found_at_start_without_reads(damage, clean_store, tmp_path,
                                                                            capsys, monkeypatch):
    store = _copy(clean_store, tmp_path)
    name, shard = _shard(store, 1)
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    read = []
    real = store_mod.StoreVolume._read
    monkeypatch.setattr(store_mod.StoreVolume, "_read", lambda self, region: read.append(self.name) or
                        real(self, region))
    run = tmp_path / "run"
    code = PRETRAIN.call(run, store, "train.max_steps=4", "data.on_bad_data=skip")
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert name not in read and read  # never read: quarantined from the start, the others trained
    problem = "truncated" if damage == "truncated" else "missing"
    assert any(f"store case {name}" in l and problem in l and "--verify" in l for l in err.splitlines()), err[-3000:]
    tail = err[err.rindex("checkpoint saved"):]
    assert "1 bad volume(s) were left out" in tail and name in tail  # listed again at the end
    assert [s for s, _ in step_losses(run)] == [1, 2, 3, 4]

    run2 = tmp_path / "run2"
    code = PRETRAIN.call(run2, store, "train.max_steps=4", "data.on_bad_data=fail")
    err = capsys.readouterr().err
    assert code == 2 and name in err and "on_bad_data=fail" in err and problem in err, err[-3000:]
    assert not (run2 / "checkpoints").exists() and not metrics(run2)  # stopped before training
    _no_noise(err)


# ----------------------------------------------------------------------------- at read time: checksums


def test_a_flipped_byte_under_skip_quarantines_the_case_once_and_resume_repeats_the_run(clean_store, tmp_path,
                                                                                       capsys):
    store = _copy(clean_store, tmp_path)
    name, shard = _shard(store, 3)
    size = shard.stat().st_size
    _flip_middle(shard)
    assert shard.stat().st_size == size  # the start check cannot see it
    extra = ["train.max_steps=6", "train.ckpt_every=2", "data.on_bad_data=skip"]
    ref = tmp_path / "ref"
    code = PRETRAIN.call(ref, store, *extra)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    warned = [l for l in err.splitlines() if f"case {name} is damaged" in l]
    assert len(warned) == 1, err[-3000:]  # once, though later samples would draw it too
    assert "checksum" in warned[0] and f"--out {store} --verify" in warned[0] and "on_bad_data=skip" in warned[0]
    assert [s for s, _ in step_losses(ref)] == list(range(1, 7)) and (ref / "encoder.pt").is_file()
    _no_noise(err)

    # the same run stopped by the damage (fail: checkpoint of step 1) and resumed under skip in a
    # fresh quarantine, as a new process has: it finds the damage again and redraws alike
    part = tmp_path / "part"
    assert PRETRAIN.call(part, store, *extra[:2], "data.on_bad_data=fail") == 2
    assert checkpoint_step(part) == 1
    crops._QUARANTINED.clear()
    assert PRETRAIN.call(part, store, *extra, "--resume") == 0
    capsys.readouterr()
    assert step_losses(part) == step_losses(ref)  # redraws depend on the sample's seed only


def test_a_flipped_byte_under_fail_stops_cleanly_with_a_checkpoint_that_resumes(clean_store, tmp_path, capsys):
    store = _copy(clean_store, tmp_path)
    name, shard = _shard(store, 3)  # batch 2: step 1 reads volumes 0, 1; step 2 reads 2, then 3
    _flip_middle(shard)
    run = tmp_path / "run"
    code = PRETRAIN.call(run, store, "train.max_steps=25", "train.ckpt_every=10", "data.on_bad_data=fail")
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    (line,) = _error_lines(err)
    assert name in line and "checksum" in line and f"--out {store} --verify" in line and "on_bad_data=fail" in line
    _no_noise(err)
    assert checkpoint_step(run) == 1  # the last completed step, saved on the way out
    assert "stopped on an error after step 1; checkpoint saved" in err
    assert [s for s, _ in step_losses(run)] == [1]

    code = PRETRAIN.call(run, store, "train.max_steps=4", "train.ckpt_every=10", "data.on_bad_data=skip",
                         "--resume")
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "resuming from step 1" in err
    assert [s for s, _ in step_losses(run)] == [1, 2, 3, 4] and checkpoint_step(run) == 4


def test_a_failure_in_step_1_leaves_a_folder_that_restarts_with_or_without_resume(clean_store, tmp_path, capsys):
    store = _copy(clean_store, tmp_path)
    name, shard = _shard(store, 1)  # read by step 1
    _flip_middle(shard)
    run = tmp_path / "run"
    assert PRETRAIN.call(run, store, "train.max_steps=3", "data.on_bad_data=fail") == 2
    capsys.readouterr()
    assert not (run / "checkpoints" / "last.pt").exists() and (run / "config.yaml").is_file()

    assert PRETRAIN.call(run, store, "train.max_steps=2", "data.on_bad_data=skip", "--resume") == 0
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "starting from step 0" in err, err[-3000:]
    assert [s for s, _ in step_losses(run)] == [1, 2] and checkpoint_step(run) == 2
    assert "on_bad_data: skip" in (run / "config.yaml").read_text()  # the config of the run that trained

    again = tmp_path / "again"
    assert PRETRAIN.call(again, store, "train.max_steps=3", "train.ckpt_every=0", "data.on_bad_data=fail") == 2
    capsys.readouterr()
    assert PRETRAIN.call(again, store, "train.max_steps=2", "data.on_bad_data=skip") == 0  # no --resume: reused
    err = capsys.readouterr().err
    assert "reusing it" in err and [s for s, _ in step_losses(again)] == [1, 2]


def test_a_worker_error_reaches_the_user_as_one_line(clean_store, tmp_path, capsys):
    """With DataLoader workers the error crosses a process: still one line, without the worker's traceback."""
    store = _copy(clean_store, tmp_path)
    name, shard = _shard(store, 3)
    _flip_middle(shard)
    run = tmp_path / "run"
    code = PRETRAIN.call(run, store, "train.max_steps=6", "train.num_workers=1", "data.on_bad_data=fail")
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    (line,) = _error_lines(err)
    assert line.startswith(f"error: {store / 'cases' / name}: corrupt store entry") and "--verify" in line
    _no_noise(err)
    assert checkpoint_step(run) == 1


# ----------------------------------------------------------------------------- the datasets


def _vols(store: Path, policy: str):
    vols = open_store(store).volumes(WINDOW)
    for v in vols:
        v.on_bad_read = policy
    return vols


def test_crop_redraws_are_a_function_of_the_sample_seed(clean_store, tmp_path):
    store = _copy(clean_store, tmp_path)
    bad_name, shard = _shard(store, 2)
    _flip_middle(shard)
    ds = crops.RandomCropDataset(_vols(store, "skip"), (16, 16, 8), seed=5)
    good = crops.RandomCropDataset(_vols(clean_store, "skip"), (16, 16, 8), seed=5)
    first = ds[2]["image"]  # volume 2 is the damaged one: found here, sample drawn again
    assert crops.is_quarantined(ds.volumes[2]) and not any(crops.is_quarantined(v) for v in ds.volumes[:2])
    assert not np.array_equal(first.numpy(), good[2]["image"].numpy())
    assert np.array_equal(ds[1]["image"].numpy(), good[1]["image"].numpy())  # undamaged samples unchanged
    later = [ds[i]["image"] for i in (6, 10, 14)]  # also volume 2: redrawn without reading it
    crops._QUARANTINED.clear()  # another process, which finds the damage at another sample
    ds2 = crops.RandomCropDataset(_vols(store, "skip"), (16, 16, 8), seed=5)
    for i, a in zip((14, 10, 6, 2), (*reversed(later), first)):
        assert np.array_equal(ds2[i]["image"].numpy(), a.numpy())

    crops._QUARANTINED.clear()
    with pytest.raises(store_mod.StoreError, match=rf"{bad_name}.*checksum.*on_bad_data=fail"):
        crops.RandomCropDataset(_vols(store, "fail"), (16, 16, 8), seed=5)[2]


def test_pair_redraws_skip_the_damaged_case_deterministically(clean_store, tmp_path):
    store = _copy(clean_store, tmp_path)
    _, shard = _shard(store, 0)
    _flip_middle(shard)
    pairs = PairDataset(PairSampler(_vols(store, "skip"), None, crop_size=(16, 16, 8), seed=1), seed=3)
    items = [pairs[i] for i in range(12)]
    assert all(0 not in it["ids"].tolist() for it in items)
    crops._QUARANTINED.clear()  # a fresh process, drawing in another order, finds the damage at another pair
    again = PairDataset(PairSampler(_vols(store, "skip"), None, crop_size=(16, 16, 8), seed=1), seed=3)
    for i in reversed(range(12)):
        b = again[i]
        assert b["ids"].tolist() == items[i]["ids"].tolist() and np.array_equal(b["q"].numpy(), items[i]["q"].numpy())

    for v in again.sampler.entries[1:]:  # with one readable volume left, no pair can be drawn
        crops._QUARANTINED[crops._key(v)] = "test"
    with pytest.raises(crops.DataError, match="fewer than 2 readable volume"):
        again[0]


# ----------------------------------------------------------------------------- zarr's event loop


NOISE_SCRIPT = textwrap.dedent("""
    import gc, logging, sys
    import numpy as np
    from alice3d.data import store as store_mod
    from alice3d.data.preprocess import _zarr_array
    logging.basicConfig(level=logging.INFO)  # as the CLIs do: asyncio's errors would be printed
    root = sys.argv[1]  # STORE/cases/x/image
    volume = np.random.default_rng(0).integers(-1000, 1000, (192, 192, 128)).astype(np.int16)  # 18 chunks
    _zarr_array(__import__("pathlib").Path(root), volume)
    shard = root + "/c/0/0/0"
    data = bytearray(open(shard, "rb").read())
    for f in np.linspace(0.02, 0.9, 6):  # six damaged chunks: the read fails with others in flight
        m = int(len(data) * f)
        data[m: m + 8] = bytes(b ^ 0xFF for b in data[m: m + 8])
    open(shard, "wb").write(bytes(data))
    case = {"name": "x", "source": "x.nii.gz", "shape": list(volume.shape), "affine": np.eye(4).tolist(),
            "body_lo_mm": [0, 0, 0], "body_hi_mm": [1, 1, 1], "hu_min": -1000, "image_nbytes": len(data)}
    try:
        store_mod.StoreVolume(sys.argv[2], case, (-125.0, 255.0)).read_hu()
    except store_mod.StoreError as e:
        print("raised:", e)
    gc.collect()
""")


def test_zarr_loop_leftover_errors_go_to_the_debug_log(caplog):
    """What asyncio logs for a task nobody awaited: shown by default, debug-only on zarr's loop."""
    loop = _get_loop()
    loop.set_exception_handler(None)  # as before any store read of this process
    store_mod._QUIET_LOOP[0] = None

    def leftover():
        async def report():
            asyncio.get_running_loop().call_exception_handler(
                {"message": "Task exception was never retrieved", "exception": ValueError("checksum")})
        asyncio.run_coroutine_threadsafe(report(), loop).result(timeout=10)

    caplog.set_level(logging.DEBUG)
    leftover()
    assert [r.levelno for r in caplog.records if r.name == "asyncio"] == [logging.ERROR]
    caplog.clear()
    store_mod.quiet_zarr_loop()
    leftover()
    assert not [r for r in caplog.records if r.name == "asyncio"]
    (rec,) = [r for r in caplog.records if "zarr event loop" in r.getMessage()]
    assert rec.levelno == logging.DEBUG and "never retrieved" in rec.getMessage() and "checksum" in rec.getMessage()


def test_a_failed_multi_chunk_read_prints_nothing_but_its_error(tmp_path):
    """The real case in a fresh process (the leftovers surface at exit, when zarr shuts down)."""
    for k in range(2):  # whether tasks are left in flight depends on timing: two tries
        store = tmp_path / f"s{k}"
        out = subprocess.run([sys.executable, "-c", NOISE_SCRIPT, str(store / "cases" / "x" / "image"), str(store)],
                             capture_output=True, text=True, timeout=120,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0 and "raised:" in out.stdout and "checksum" in out.stdout, out.stderr[-2000:]
        assert "Task" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
