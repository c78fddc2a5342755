"""Run directories: the leftovers of a start that never trained are reused, a run is never overwritten."""

from __future__ import annotations

import logging

import pytest

from alice3d.cli.common import prepare_run_dir


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _write(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(autouse=True)
def main_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)


def test_leftovers_of_a_failed_start_are_removed_and_the_directory_reused(tmp_path, caplog):
    out = tmp_path / "run"
    _write(out, {"config.yaml": "train:\n  max_steps: 5\n", "data_report.json": "{}", "metrics.jsonl": "",
                 "checkpoints/.last.pt.123.tmp": "half a save", "fold_0/config.yaml": "x: 1\n"})
    (out / "previews").mkdir()
    (out / "fold_1").mkdir()
    caplog.set_level(logging.INFO, logger="alice3d")
    assert prepare_run_dir(out, resume=False) == out
    assert out.is_dir() and list(out.iterdir()) == []
    (line,) = [r.getMessage() for r in caplog.records if "reusing it" in r.getMessage()]
    assert "config.yaml" in line and "metrics.jsonl" in line and str(out) in line


def test_an_empty_or_missing_directory_is_used(tmp_path):
    assert prepare_run_dir(tmp_path / "new" / "run", resume=False).is_dir()
    (tmp_path / "empty").mkdir()
    assert prepare_run_dir(tmp_path / "empty", resume=False) == tmp_path / "empty"


@pytest.mark.parametrize("files,blocker,what", [
    ({"config.yaml": "a: 1\n", "checkpoints/last.pt": "ckpt"}, "checkpoints/last.pt", "a run"),
    ({"config.yaml": "a: 1\n", "best.pt": "w"}, "best.pt", "a run"),
    ({"encoder.pt": "w"}, "encoder.pt", "a run"),
    ({"landmark.pt": "w"}, "landmark.pt", "a run"),
    ({"results.json": "{}"}, "results.json", "a run"),
    ({"config.yaml": "a: 1\n", "metrics.jsonl": '{"step": 1, "loss": 0.5}\n', "checkpoints/last.pt": "ckpt"},
     "checkpoints/last.pt", "a run"),
    ({"previews/step_0000004.png": "png"}, "previews/step_0000004.png", "a run"),
    ({"fold_0/config.yaml": "a: 1\n", "fold_1/checkpoints/last.pt": "ckpt"}, "fold_1/checkpoints/last.pt", "a run"),
    ({"config.yaml": "a: 1\n", "notes.txt": "mine"}, "notes.txt", "files that are not from a run"),
])
def test_a_run_or_foreign_files_are_refused_and_left_untouched(tmp_path, files, blocker, what):
    out = tmp_path / "run"
    _write(out, files)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        prepare_run_dir(out, resume=False)
    msg = str(e.value)
    assert f"{out} is not empty: it holds {what} ({blocker})" in msg and "--resume" in msg
    assert "nothing was overwritten" in msg
    assert _snapshot(out) == before


def test_metrics_lines_without_a_checkpoint_are_a_failed_start(tmp_path, caplog):
    """A run that stopped before its first checkpoint logged steps that cannot be continued: reusable."""
    out = tmp_path / "run"
    _write(out, {"config.yaml": "a: 1\n", "metrics.jsonl": '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n',
                 "checkpoints/.last.pt.77.tmp": "half"})
    caplog.set_level(logging.INFO, logger="alice3d")
    assert prepare_run_dir(out, resume=False) == out
    assert list(out.iterdir()) == []
    assert any("reusing it" in r.getMessage() and "metrics.jsonl" in r.getMessage() for r in caplog.records)


def test_resume_without_a_checkpoint_starts_over_and_touches_nothing(tmp_path, caplog):
    out = tmp_path / "run"
    _write(out, {"config.yaml": "a: 1\n", "metrics.jsonl": '{"step": 1, "loss": 0.5}\n'})
    before = _snapshot(out)
    caplog.set_level(logging.INFO, logger="alice3d")
    assert prepare_run_dir(out, resume=True) == out  # the trainer logs that it starts from step 0
    assert _snapshot(out) == before  # the trainer overwrites them when it starts
    assert prepare_run_dir(out, resume=True, marker="results.json") == out
    (line,) = [r.getMessage() for r in caplog.records if "holds no" in r.getMessage()]
    assert line == f"--resume: {out} holds no results.json; starting from step 0"
    assert prepare_run_dir(tmp_path / "new", resume=True).is_dir()  # nothing there yet: a fresh start


@pytest.mark.parametrize("files,blocker", [
    ({"encoder.pt": "w"}, "encoder.pt"),
    ({"config.yaml": "a: 1\n", "results.json": "{}"}, "results.json"),
    ({"notes.txt": "mine"}, "notes.txt"),
])
def test_resume_without_a_checkpoint_still_refuses_outputs_and_foreign_files(tmp_path, files, blocker):
    out = tmp_path / "run"
    _write(out, files)
    before = _snapshot(out)
    with pytest.raises(SystemExit, match=rf"--resume given but .*last.pt does not exist.*\({blocker}\)"):
        prepare_run_dir(out, resume=True)
    assert _snapshot(out) == before


def test_a_file_is_not_a_run_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        prepare_run_dir(tmp_path / "f", resume=False)


def test_resume_without_config_flags_continues_with_the_runs_own_config(tmp_path):
    # A run started with non-default settings and stopped before its first checkpoint: the leftover
    # config.yaml is what `--out RUN --resume` continues with, overrides on top; not the defaults.
    from argparse import Namespace

    from alice3d.cli.common import resolve_config, write_resolved_config
    from alice3d.pretrain.config import PretrainConfig

    run = tmp_path / "run"
    run.mkdir()
    started = resolve_config(PretrainConfig, Namespace(config=None, overrides=[
        "train.max_steps=7", "method=mae", "data.spacing=[4,4,3]"], out=run, resume=False))
    write_resolved_config(started, run)
    resumed = resolve_config(PretrainConfig, Namespace(config=None, overrides=["train.lr=0.5"], out=run, resume=True))
    assert (resumed.train.max_steps, resumed.method, list(resumed.data.spacing)) == (7, "mae", [4.0, 4.0, 3.0])
    assert resumed.train.lr == 0.5
    fresh = resolve_config(PretrainConfig, Namespace(config=None, overrides=[], out=run, resume=False))
    assert fresh.train.max_steps == PretrainConfig().train.max_steps != 7  # without --resume: the defaults
