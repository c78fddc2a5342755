"""The few-label protocol's arithmetic (scripts/experiments/fewlabel_transfer.py): validation curves read
from each run's metrics.jsonl, mean/std over seeds, the verdicts and the markdown tables.

No training runs here: the results are hand-made, so every figure below is computed by hand.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "scripts" / "experiments"


@pytest.fixture(scope="module")
def fl():
    import sys

    sys.path.insert(0, str(EXPERIMENTS))  # the script imports its sibling frozen_probe
    try:
        spec = importlib.util.spec_from_file_location("fewlabel_transfer", EXPERIMENTS / "fewlabel_transfer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return module


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_validation_curve_reads_only_validation_lines_and_the_last_value_of_a_step(fl, tmp_path):
    metrics = _write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 10, "loss": 1.2},
        {"step": 250, "val_mean_dice": 0.10},
        {"step": 300, "loss": 0.9, "lr": 1e-4},
        {"step": 500, "val_mean_dice": 0.15},
        {"step": 500, "val_mean_dice": 0.17},  # resumed run re-validated step 500
    ])
    assert fl.validation_curve(metrics) == {250: 0.10, 500: 0.17}
    assert fl.validation_curve(tmp_path / "missing.jsonl") == {}


def _run(dice: float, organs: dict[str, float], curve: dict[int, float]) -> dict:
    return {"metrics": {"mean_dice": dice, "mean_nsd": dice / 2,
                        "per_organ": {o: {"dice": {"mean": d}} for o, d in organs.items()}},
            "curve": curve}


def _args(fl, tmp_path):
    return fl.parse(["--out", str(tmp_path / "out"), "--arms", "random", "alice", "--n-labeled", "2",
                     "--seeds", "0", "1", "2", "--no-probe"])


def _finetunes():
    random = [_run(0.10, {"liver": 0.2, "spleen": 0.0}, {250: 0.05, 500: 0.08, 1000: 0.10}),
              _run(0.12, {"liver": 0.3, "spleen": 0.0}, {250: 0.07, 500: 0.10, 1000: 0.12}),
              _run(0.14, {"liver": 0.4, "spleen": 0.0}, {250: 0.06, 500: 0.12, 750: 0.2, 1000: 0.14})]
    alice = [_run(0.20, {"liver": 0.5, "spleen": 0.1}, {250: 0.10, 500: 0.15, 1000: 0.20}),
             _run(0.22, {"liver": 0.6, "spleen": 0.1}, {250: 0.10, 500: 0.20, 1000: 0.22}),
             _run(0.30, {"liver": 0.7, "spleen": 0.4}, {250: 0.10, 500: 0.25, 1000: 0.30})]
    return {"random": {2: random}, "alice": {2: alice}}


def test_summary_means_stds_and_the_target_verdict(fl, tmp_path):
    args = _args(fl, tmp_path)
    summary = fl.summarize(args, {}, _finetunes())
    random, alice = summary["arms"]["random"]["finetune"][2], summary["arms"]["alice"]["finetune"][2]
    assert random["dice"]["mean"] == pytest.approx(0.12) and random["dice"]["std"] == pytest.approx(0.02)
    assert alice["dice"]["mean"] == pytest.approx(0.24)
    assert alice["dice"]["std"] == pytest.approx(statistics.stdev([0.20, 0.22, 0.30]))  # 0.0529
    assert alice["per_organ_dice"] == pytest.approx({"liver": 0.6, "spleen": 0.2})
    v = summary["verdicts"]["alice_vs_random_dice_n2"]
    # +12 points, spread = the larger std (5.29 points): beyond it and >= 5 points, so the target is met.
    assert v["diff"] == pytest.approx(0.12) and v["spread"] == pytest.approx(0.052915, abs=1e-6)
    assert v["beyond_spread"] and v["target_met"]
    # Only the steps every seed validated at; step 750 exists in one random run only.
    assert list(random["curve"]) == [250, 500, 1000]
    assert random["curve"][500]["mean"] == pytest.approx(0.10) and random["curve"][500]["std"] == pytest.approx(0.02)
    assert alice["curve"][250] == {"mean": pytest.approx(0.10), "std": 0.0, "values": [0.10, 0.10, 0.10]}


def test_target_needs_five_points_even_when_beyond_the_spread(fl, tmp_path):
    args = _args(fl, tmp_path)
    finetunes = _finetunes()
    finetunes["alice"][2] = [_run(d, {"liver": d}, {}) for d in (0.15, 0.16, 0.17)]  # +4 points, spread 2
    v = fl.summarize(args, {}, finetunes)["verdicts"]["alice_vs_random_dice_n2"]
    assert v["diff"] == pytest.approx(0.04) and v["beyond_spread"] and not v["target_met"]


def test_markdown_has_the_curve_table_only_when_runs_validated_more_than_once(fl, tmp_path):
    args = _args(fl, tmp_path)
    text = fl.markdown(args, fl.summarize(args, {}, _finetunes()), {"finetune": 120.0}, [])
    assert "| random init | 12.00 ± 2.00 |" in text
    assert "Validation Dice (%) during fine-tuning, n=2" in text
    assert "| 500 | 10.00 ± 2.00 | 20.00 ± 5.00 |" in text
    assert "| 750 |" not in text

    once = _finetunes()
    for runs in (once["random"][2], once["alice"][2]):
        for r in runs:
            r["curve"] = {1000: r["metrics"]["mean_dice"]}
    assert "during fine-tuning" not in fl.markdown(args, fl.summarize(args, {}, once), {}, [])


def test_wall_time_names_the_runs_an_earlier_invocation_made(fl, tmp_path):
    args = fl.parse(["--out", str(tmp_path / "out"), "--arms", "random", "alice", "--seeds", "0", "1", "--dry-run"])
    done = args.out / "pretrain" / "alice_seed1" / "encoder.pt"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"")
    runner = fl.Runner(args.out, threads=1, dry=True)
    fl.pretrain_all(args, runner)
    assert runner.n_reused == 1 and len(runner.commands) == 2

    summary = fl.summarize(_args(fl, tmp_path), {}, _finetunes())
    text = fl.markdown(_args(fl, tmp_path), summary, {"fine-tuning": 60.0}, [], reused=runner.n_reused)
    assert "fine-tuning 1.0 min (1 run reused from an earlier invocation is not in these times)." in text
    assert "reused" not in fl.markdown(_args(fl, tmp_path), summary, {"fine-tuning": 60.0}, [])


def _planned(fl, tmp_path, *extra):
    """The encoder map and the pretraining commands a dry run plans (nothing runs)."""
    args = fl.parse(["--out", str(tmp_path / "out"), "--arms", "random", "mae", "alice", "--seeds", "0", "1", "2",
                     "--dry-run", *extra])
    runner = fl.Runner(args.out, threads=1, dry=True)
    return fl.pretrain_all(args, runner), [c for c in runner.commands if "pretrain" in c]


def test_every_seed_pretrains_its_own_encoders_by_default(fl, tmp_path):
    encoders, commands = _planned(fl, tmp_path)
    pre = tmp_path / "out" / "pretrain"
    assert encoders == {name: {s: pre / f"{name}_seed{s}" / "encoder.pt" for s in (0, 1, 2)} for name in ("mae", "alice")}
    assert len(commands) == 6
    assert sum(f"alice_seed{s} " in c and f"train.seed={s}" in c for c in commands for s in (0, 1, 2)) == 3
    # random init takes the architecture of the same seed's Alice encoder
    assert fl.reference_encoder(encoders, 2) == pre / "alice_seed2" / "encoder.pt"


def test_one_pretraining_shares_one_encoder_per_arm_and_given_files_serve_every_seed(fl, tmp_path):
    mine = tmp_path / "mine.pt"
    encoders, commands = _planned(fl, tmp_path, "--one-pretraining", "--pretrain-seed", "7", "--encoder", f"mae={mine}")
    assert encoders["alice"] == {s: tmp_path / "out" / "pretrain" / "alice" / "encoder.pt" for s in (0, 1, 2)}
    assert encoders["mae"] == {s: mine for s in (0, 1, 2)}
    assert len(commands) == 1 and "train.seed=7" in commands[0]


def test_settings_fill_what_the_command_line_leaves_open(fl, tmp_path):
    frozen = fl.parse(["--out", str(tmp_path / "a"), "--setting", "frozen"])
    assert frozen.arms == ["random", "mae", "alice"] and frozen.n_labeled == [2]
    assert "optim.encoder_lr_scale=0" in frozen.finetune_args and frozen.finetune_steps == 1000
    cpu = fl.parse(["--out", str(tmp_path / "b"), "--n-labeled", "6"])
    assert cpu.arms == fl.DEFAULT_ARMS and cpu.n_labeled == [6] and cpu.pretrain_per_seed
