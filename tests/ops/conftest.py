"""tests/ops runs thousands of convolutions on tiny tensors: one intra-op thread is much faster for those (on a
busy 2-core machine, OpenMP synchronisation turns a microsecond conv into tens of milliseconds). Scoped to each
test here and restored afterwards, so other test folders keep torch's default."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_for_tiny_tensors():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
