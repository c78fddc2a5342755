"""The embedded Alice default does not collapse: target_std stays spread out over its whole run."""

from __future__ import annotations

import json
import logging
import statistics

import pytest
import torch

from alice3d.cli.pretrain import main


@pytest.mark.slow
def test_embedded_default_keeps_the_target_spread(tmp_path, caplog):
    """`alice3d-pretrain --out RUN` as shipped (150 steps; about 1-3 min on 2 CPU cores)."""
    torch.set_num_threads(2)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="alice3d.train"), pytest.raises(SystemExit) as e:
        main(["--out", str(run), "train.device=cpu"])
    assert e.value.code == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "target_std" in r]
    assert len(records) == 150
    last_quarter = records[-len(records) // 4:]
    assert statistics.mean(r["target_std"] for r in last_quarter) >= 0.3
    assert statistics.mean(r["online_std"] for r in last_quarter) >= 0.3
    assert not [r for r in caplog.records if "collapse" in r.getMessage()]
