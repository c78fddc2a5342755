"""Two-process gloo runs: when one process dies or hangs, the other stops with a clear message
within train.dist_timeout_s instead of waiting forever. Every wait here has a hard timeout."""

from __future__ import annotations

import signal

import pytest
from faults import COMMANDS, log_text, wait_for_steps

TIMEOUT_S = 5



@pytest.mark.parametrize("name,fault", [
    pytest.param("pretrain", "kill", id="pretrain-rank1-killed"),
    pytest.param("pretrain", "hang", id="pretrain-rank1-hangs", marks=pytest.mark.slow),
    pytest.param("finetune", "kill", id="finetune-rank1-killed", marks=pytest.mark.slow),
])
def test_surviving_rank_stops_with_a_message(name, fault, cohort, tmp_path, free_port):
    cmd = COMMANDS[name]
    run = tmp_path / "run"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "WORLD_SIZE": "2"}
    extra = ["train.max_steps=100000", "train.ckpt_every=2", "train.batch_size=1", "train.eval_every=0",
             f"train.dist_timeout_s={TIMEOUT_S}"]
    procs = [cmd.popen(run, cohort, *extra, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                       log=tmp_path / f"rank{r}.log") for r in range(2)]
    try:
        wait_for_steps(run, 3, procs[0])
        procs[1].send_signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        # a dead peer is noticed at once, a silent one after TIMEOUT_S; both well within this bound
        code = procs[0].wait(timeout=TIMEOUT_S + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    out = log_text(tmp_path / "rank0.log")
    assert code == 2, out[-3000:]
    assert "another process of this distributed run stopped or did not answer" in out
    assert f"train.dist_timeout_s={TIMEOUT_S}" in out and "--resume" in out
    assert "Traceback" not in out
