"""The shared test fixture one_thread (tests/conftest.py) and the shared tiny-ViT size (tests/helpers.py)."""

import pytest
import torch
from helpers import TINY_VIT

from alice3d.encoders.vit import ViTEncoder


@pytest.fixture
def two_threads_checked_after():
    """Two threads before one_thread starts; after it ends, the two must be back."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    restored = torch.get_num_threads()
    torch.set_num_threads(old)
    assert restored == 2, f"one_thread left {restored} threads instead of restoring 2"


def test_one_thread_runs_the_test_on_one_thread_and_restores_the_count(two_threads_checked_after, one_thread):
    assert torch.get_num_threads() == 1


def test_tiny_vit_builds_a_two_layer_48_wide_encoder():
    enc = ViTEncoder((16, 16, 16), 8, **TINY_VIT)
    assert len(enc.blocks) == 2 and enc.hidden_size == 48
