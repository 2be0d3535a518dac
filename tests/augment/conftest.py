"""Augmentation tests run one torch thread: their tensors are small, and on a shared CPU several threads mostly wait."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield
