"""On a CUDA machine: every fused kernel compiled for the real GPU and checked against the reference.

`ganpipe bench ops` compares each Triton result with the reference on the shapes it times and exits 1 on any
difference (or a kernel that falls back); here it runs in a fresh process without TRITON_INTERPRET, so the kernels
are compiled for the device rather than interpreted. Skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_compiled_for_the_gpu_match_the_reference() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "tools" / "bench_ops.py"), "--quick", "--warmup", "5", "--rep", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAIL" not in proc.stdout
