"""Fixtures shared by every test folder."""

import socket

import pytest
import torch


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (rendezvous of 2-process gloo runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """torch on one thread for the test, the previous count restored after it. Tiny tensors on a
    shared 2-core machine run far faster single-threaded (extra OpenMP threads only spin-wait).
    A module that wants it for every test says ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
