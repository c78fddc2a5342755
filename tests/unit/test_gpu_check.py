"""scripts/gpu_check.py: the smoke run end to end, and its budget, failure and report plumbing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # gpu_check imports the bench scripts as sibling modules

import gpu_check  # noqa: E402

SECTIONS = ["bf16_correctness", "alice_vit_b", "visible_vs_dense", "swin_unetr_finetune", "sliding_window_512",
            "landmark", "data_path"]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ctx(tmp_path, budgets=None, total=60.0):
    preset = gpu_check.Preset(name="test", budgets=budgets or {}, total_budget_s=total)
    return gpu_check.Context(preset, torch.device("cpu"), tmp_path, ["--out", str(tmp_path)])


def test_check_compares_and_treats_unmeasured_as_not_met():
    assert gpu_check.check("mfu", 40.0, ">=", 40.0, " %")["met"] is True
    assert gpu_check.check("mfu", 39.9, ">=", 40.0, " %")["met"] is False
    assert gpu_check.check("t", 4.99, "<", 5.0)["met"] is True
    assert gpu_check.check("t", 5.0, "<", 5.0)["met"] is False
    missing = gpu_check.check("t", None, "<", 5.0, " s")
    assert missing["met"] is False and missing["measured"] is None and missing["target"] == "< 5 s"


def test_deadline_stops_the_outermost_expired_limit():
    d = gpu_check.Deadlines()
    try:
        start = time.monotonic()
        with pytest.raises(gpu_check.BudgetExceeded) as e:
            with d.limit(0.2, "section"):
                with d.limit(30, "row"):
                    while time.monotonic() - start < 5:
                        pass
        assert e.value.label == "section" and time.monotonic() - start < 2
        with d.limit(0.05, "short"):  # a limit that was left in time never fires later
            pass
        time.sleep(0.1)
    finally:
        d.close()


def test_a_failing_or_overrunning_section_is_reported_and_the_next_one_still_runs(tmp_path, monkeypatch):
    def ok(ctx, res):
        res["targets"] = [gpu_check.check("x", 1.0, ">=", 0.5)]

    def broken(ctx, res):
        raise ValueError("no such kernel")

    def slow(ctx, res):
        gpu_check._run_row(ctx, res, {"what": "fast"}, lambda: {"value": 1.0})
        while True:
            pass

    monkeypatch.setattr(gpu_check, "SECTIONS", {"broken": broken, "slow": slow, "ok": ok})
    ctx = _ctx(tmp_path, budgets={"broken": 5, "slow": 0.3, "ok": 5})
    try:
        status = gpu_check.run(ctx, ["broken", "slow", "ok"])
    finally:
        ctx.deadlines.close()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert status == 1 and report["finished"] is True
    assert sections["broken"]["status"] == "error: ValueError: no such kernel"
    assert sections["slow"]["status"].startswith("error: ran past its budget of 0.3 s (slow)")
    assert sections["slow"]["rows"][0]["value"] == 1.0  # finished before the budget ran out: kept
    assert sections["ok"]["status"] == "ok" and sections["ok"]["targets"][0]["met"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| ok | x | 1 | >= 0.5 | yes |" in md
    assert "| broken | (none measured) | n/a | | no: error: ValueError: no such kernel |" in md


def test_sections_after_the_run_budget_are_skipped(tmp_path, monkeypatch):
    def spin(ctx, res):
        while True:
            pass

    monkeypatch.setattr(gpu_check, "SECTIONS", {"a": spin, "b": spin})
    ctx = _ctx(tmp_path, budgets={"a": 30, "b": 30}, total=0.3)
    try:
        gpu_check.run(ctx, ["a", "b"])
    finally:
        ctx.deadlines.close()
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["a"]["status"] == "error: the run's budget was spent during this section"
    assert sections["b"]["status"] == "skipped: the run's budget of 0.3 s was spent before this section"


def _spin(*args, **kwargs):
    while True:
        pass


def test_a_row_past_its_own_budget_is_stopped_and_the_next_row_still_runs(tmp_path):
    ctx = _ctx(tmp_path)
    res: dict = {}
    try:
        start = time.monotonic()
        with ctx.deadlines.limit(5, "section"):
            gpu_check._run_row(ctx, res, {"what": "hangs"}, _spin, budget=0.2, label="row_a")
            gpu_check._run_row(ctx, res, {"what": "quick"}, lambda: {"value": 2.0}, budget=0.2, label="row_b")
        took = time.monotonic() - start
    finally:
        ctx.deadlines.close()
    hung, quick = res["rows"]
    assert hung["status"] == "error: ran past its budget of 0.2 s (row_a)"
    assert quick["status"] == "ok" and quick["value"] == 2.0
    assert took < 3  # stopped at the row's 0.2 s, not at the section's 5 s


def test_a_row_that_outlives_its_section_stops_the_section_not_just_the_row(tmp_path, monkeypatch):
    def section(ctx, res):
        gpu_check._run_row(ctx, res, {"what": "long"}, _spin, budget=30, label="row")
        gpu_check._run_row(ctx, res, {"what": "never reached"}, lambda: {})

    monkeypatch.setattr(gpu_check, "SECTIONS", {"sec": section})
    ctx = _ctx(tmp_path, budgets={"sec": 0.3})
    try:
        res = gpu_check.run_section(ctx, "sec")
    finally:
        ctx.deadlines.close()
    assert res["status"] == "error: ran past its budget of 0.3 s (sec); the rows finished before are kept"
    assert [r["what"] for r in res["rows"]] == ["long"] and "status" not in res["rows"][0]


@pytest.mark.parametrize("preset", ["FULL", "SMOKE"])
def test_every_section_runs_under_each_presets_budgets(tmp_path, monkeypatch, preset):
    p = getattr(gpu_check, preset)
    monkeypatch.setattr(gpu_check, "SECTIONS", {name: lambda ctx, res: None for name in gpu_check.SECTIONS})
    ctx = gpu_check.Context(p, torch.device("cpu"), tmp_path, [])
    try:
        status = gpu_check.run(ctx, SECTIONS)
    finally:
        ctx.deadlines.close()
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert status == 0 and list(sections) == SECTIONS
    assert all(r["status"] == "ok" and r["budget_s"] > 0 for r in sections.values()), sections


def test_full_preset_row_budgets_stop_each_alice_row_under_its_own_name(tmp_path, monkeypatch):
    """The full preset's Alice rows (scaled down 100x) each hang: each is stopped by its own
    budget, so every row label the section uses has one and the section reaches all four."""
    rows = {k: v / 100 for k, v in gpu_check.FULL.alice_row_budgets.items()}
    p = replace(gpu_check.FULL, alice_row_budgets=rows, budgets={"alice_vit_b": 30.0})
    monkeypatch.setattr(gpu_check, "_pretrain_row", _spin)
    monkeypatch.setattr(gpu_check.Context, "peak", lambda self, dtype: {})
    monkeypatch.setattr(gpu_check.bc, "compile_unavailable", lambda device: None)
    ctx = gpu_check.Context(p, torch.device("cpu"), tmp_path, [])
    try:
        res = gpu_check.run_section(ctx, "alice_vit_b")
    finally:
        ctx.deadlines.close()
    assert res["status"] == "ok"
    labels = [f"{mode}_{m}" for mode in ("eager", "compile") for m in ("alice_vit", "alice_swin")]
    assert [f"{'compile' if 'compile' in r['variant'] else 'eager'}_{r['method']}" for r in res["rows"]] == labels
    assert [r["status"] for r in res["rows"]] == [
        f"error: ran past its budget of {rows[label]:.3g} s ({label})" for label in labels]
    assert res["targets"][0]["met"] is False and res["targets"][0]["measured"] is None


def test_full_preset_settings_build_valid_configs():
    """What the GPU run would build, checked without building it (no GPU time lost on a typo)."""
    import bench_data
    import bench_finetune
    import bench_pretrain

    from alice3d.methods.alice import AliceConfig

    p = gpu_check.FULL
    args = gpu_check._alice_args(p)
    assert (args.preset, args.crop, args.batch, args.mask) == ("paper", (192, 192, 64), 8, 0.75)
    for encoder in ("vit_b", bench_pretrain.SWIN_ENCODER["paper"]):
        AliceConfig(encoder=encoder, img_size=args.crop, use_flash_attention=True).validate("alice")
    cfg = bench_data.pretrain_config(p.data_crop, p.data_spacing, "landmark", 0, None, "lm.pt", p.data_config,
                                     ("train.device=cpu", f"train.batch_size={p.data_batch}",
                                      f"data.phantom_n={p.cohort_n}"))
    cfg.validate()
    assert (cfg.alice.encoder, cfg.alice.img_size, cfg.alice.use_flash_attention) == ("vit_b", (192, 192, 64), True)
    assert cfg.data.spacing == (1.5, 1.5, 2.0) and cfg.train.batch_size == 8 and cfg.train.amp
    for model in ("swin_unetr", "unetr"):
        _, task = bench_finetune.network_setup(model, p.ft_size, p.ft_roi[model])
        assert task.roi == (96, 96, 96)


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--sections", "alice_vit_b,warp_drive"])


def test_smoke_run_writes_every_section(tmp_path):
    """The whole script at tiny sizes on the CPU (about a minute on 2 idle cores; the first run
    on an empty cache also generates 2 phantoms and their landmark embeddings)."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["finished"] is True and report["preset"] == "smoke"
    assert list(report["sections"]) == SECTIONS
    assert report["bf16_tolerance"] == {"loss_rel": 0.02, "grad_norm_rel": 0.05}
    assert "loss within 2 %, gradient norm within 5 %" in md
    assert f"MONAI {report['versions']['monai']}" in md and report["machine"]["device"] in md
    for name, res in report["sections"].items():
        assert res["status"] == "ok", (name, res["status"])
        assert res["targets"], name
        for t in res["targets"]:
            assert _is_number(t["measured"]) and isinstance(t["met"], bool), (name, t)
            assert f"| {name} | {t['name']} |" in md
        for row in res["rows"]:
            assert row["status"] == "ok" or row["status"].startswith("skipped: ") and len(row["status"]) > 10, row
        assert f"## {name}" in md
    bf16 = report["sections"]["bf16_correctness"]["rows"]
    from alice3d.methods import METHODS

    assert [r["method"] for r in bf16] == list(METHODS)
    assert all(_is_number(r["loss_fp32"]) and _is_number(r["grad_norm_fp32"]) for r in bf16)
    alice = report["sections"]["alice_vit_b"]["rows"]
    assert [(r["method"], r["status"] == "ok") for r in alice] == [
        ("alice_vit", True), ("alice_swin", True), ("alice_vit", False), ("alice_swin", False)]
    assert all("compile" in r["variant"] and r["status"].startswith("skipped: ") for r in alice[2:])
    assert all(_is_number(r[k]) for r in alice[:2] for k in ("step_ms", "samples_s", "GFLOP_step", "MFU_pct"))
    data = report["sections"]["data_path"]["rows"][0]
    assert _is_number(data["end_to_end_samples_per_s"]) and _is_number(data["model_only_samples_per_s"])
    assert data["ratio"] == pytest.approx(data["end_to_end_samples_per_s"] / data["model_only_samples_per_s"])
