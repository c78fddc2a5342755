"""Progress reporting: a bar on a terminal, log lines with done/total, rate and ETA elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from alice3d.runtime import Progress, format_duration, format_rate, progress


class FakeClock:
    def __init__(self, step: float = 1.0):
        self.t, self.step = 100.0, step

    def __call__(self) -> float:
        return self.t

    def tick(self) -> None:
        self.t += self.step


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alice3d.progress"]


@pytest.fixture(autouse=True)
def main_process(monkeypatch, caplog):
    monkeypatch.delenv("RANK", raising=False)
    caplog.set_level(logging.INFO, logger="alice3d.progress")


def _run(n: int, clock: FakeClock, **kw) -> Progress:
    p = Progress(n, "train", tty=False, clock=clock, **kw)
    for _ in range(n):
        clock.tick()
        p.update()
    p.close()
    return p


def test_log_lines_carry_done_total_rate_and_eta(caplog):
    _run(10, FakeClock(1.0), min_interval_s=0)
    lines = _lines(caplog)
    # One line per 10 % (every item here) except the last, which the closing line reports.
    assert lines[:9] == [f"train: {k}/10 ({10 * k}%), 1.00 it/s, ETA {format_duration(10 - k)}" for k in range(1, 10)]
    assert lines[3] == "train: 4/10 (40%), 1.00 it/s, ETA 0:00:06"
    assert lines[9:] == ["train: 10/10 done in 0:00:10, 1.00 it/s"]


def test_lines_are_rate_limited_and_slow_rates_read_as_seconds_per_item(caplog):
    _run(10, FakeClock(4.0), min_interval_s=10, max_interval_s=1000)
    # 4 s per item: a 10 % mark is passed every item, but lines come at most every 10 s.
    assert _lines(caplog) == ["train: 3/10 (30%), 4.00 s/it, ETA 0:00:28",
                              "train: 6/10 (60%), 4.00 s/it, ETA 0:00:16",
                              "train: 9/10 (90%), 4.00 s/it, ETA 0:00:04",
                              "train: 10/10 done in 0:00:40, 4.00 s/it"]


def test_a_line_every_ten_percent_of_a_long_loop(caplog):
    _run(100, FakeClock(0.5), min_interval_s=0)
    lines = _lines(caplog)
    assert [l.split(" (")[0] for l in lines[:-1]] == [f"train: {k}/100" for k in range(10, 100, 10)]
    assert lines[4] == "train: 50/100 (50%), 2.00 it/s, ETA 0:00:25"


def test_max_interval_reports_a_slow_loop_between_marks(caplog):
    _run(100, FakeClock(30.0), min_interval_s=10, max_interval_s=60)
    lines = _lines(caplog)
    assert lines[0] == "train: 2/100 (2%), 30.00 s/it, ETA 0:49:00"  # 60 s passed, no 10 % mark yet
    assert lines[1].startswith("train: 4/100 (4%)")


def test_postfix_and_resumed_start(caplog):
    clock = FakeClock(2.0)
    p = Progress(8, "train", initial=4, tty=False, clock=clock, min_interval_s=0, fraction=0.25)
    for k in range(4):
        clock.tick()
        p.set_postfix(loss=f"{1.0 / (k + 1):.4f}")
        p.update()
    p.close()
    # The rate counts the 4 steps done here, not the 4 of the earlier run.
    assert _lines(caplog) == ["train: 6/8 (75%), 2.00 s/it, ETA 0:00:04, loss=0.5000",
                              "train: 8/8 done in 0:00:08, 2.00 s/it, loss=0.2500"]


def test_short_loops_stay_quiet_and_early_stops_say_so(caplog):
    _run(3, FakeClock(0.1))  # defaults: 0.3 s in all, under MIN_INTERVAL_S
    assert _lines(caplog) == []
    clock = FakeClock(6.0)
    with Progress(5, "prep", tty=False, clock=clock) as p:
        for _ in range(2):
            clock.tick()
            p.update()
    assert _lines(caplog) == ["prep: 2/5 (40%), 6.00 s/it, ETA 0:00:18", "prep: stopped at 2/5 after 0:00:12, 6.00 s/it"]


def test_iterator_form_and_unknown_total(caplog):
    clock = FakeClock(1.0)
    seen = []
    for x in progress(iter(range(3)), desc="scan", unit="case", tty=False, clock=clock, min_interval_s=0,
                      max_interval_s=0):
        clock.tick()
        seen.append(x)
    assert seen == [0, 1, 2]
    assert _lines(caplog)[0] == "scan: 1 case, 1.00 case/s"
    assert _lines(caplog)[-1] == "scan: 3 done in 0:00:03, 1.00 case/s"
    assert progress([1, 2, 3], desc="x").total == 3


def test_other_ranks_are_silent(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    buf = io.StringIO()
    _run(10, FakeClock(5.0), min_interval_s=0, file=buf)
    p = Progress(10, "bar", tty=True, file=buf)
    p.update(3)
    p.close()
    assert _lines(caplog) == [] and buf.getvalue() == ""


def test_terminal_gets_a_bar_and_no_log_lines(caplog):
    buf = io.StringIO()
    with Progress(4, "train", tty=True, file=buf, min_interval_s=0) as p:
        for _ in range(4):
            p.set_postfix(loss="0.1000")
            p.update()
    out = buf.getvalue()
    assert "train" in out and "4/4" in out and "loss=0.1000" in out
    assert _lines(caplog) == []


def test_formatting():
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"
    assert format_rate(0.25, "step") == "4.00 s/step" and format_rate(12.345, "it") == "12.35 it/s"
    assert format_rate(0.0, "it") == "? it/s"
