"""`run_main`: expected failures become one line on stderr and exit code 2."""

import subprocess
import sys
import textwrap

import pytest

BODY = textwrap.dedent("""
    import atexit, os, sys
    import alice3d.cli.common as common
    from alice3d.errors import DataError, PeerFailure

    # Stand-ins for a broken process group whose teardown aborts the process (SIGABRT).
    def teardown(wait_for_peers=True):
        print(f"teardown wait_for_peers={{wait_for_peers}}", file=sys.stderr, flush=True)
        os.abort()
    common.cleanup_distributed = teardown
    atexit.register(os.abort)

    def body():
        raise {exc}("what went wrong")

    common.run_main(body)
""")


def run_body(exc: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BODY.format(exc=exc)], capture_output=True, text=True,
                          timeout=120)


def test_a_broken_process_group_is_left_without_teardown():
    """A peer's death must give exit code 2 and the message, even when tearing the group down would
    abort: the surviving ranks' exit code is what a job scheduler and the user see."""
    proc = run_body("PeerFailure")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: what went wrong"


@pytest.mark.parametrize("exc", ["DataError", "FileNotFoundError"])
def test_other_expected_failures_still_leave_the_group(exc):
    """Ordinary failures do run the teardown (here the stand-in aborts, so the exit code shows it ran)."""
    proc = run_body(exc)
    assert proc.returncode == -6, proc.stderr
    assert "error: what went wrong" in proc.stderr
    # A failed rank must not wait at the leaving barrier: its peers may never get there.
    assert "teardown wait_for_peers=False" in proc.stderr
