"""Augmentation tests run one torch thread: their tensors are small, and on a shared CPU several threads mostly wait."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
