"""Benchmark the fused Triton ops against the PyTorch reference (see pipeline/ops/bench.py).

    python tools/bench_ops.py [--quick] [--dtypes fp32,bf16] [--warmup MS] [--rep MS]

On a CUDA device: a markdown table of forward and forward+backward times (ref, triton), speed-ups, achieved GB/s
and % of the measured copy bandwidth, on StyleGAN2 shapes and a whole 256px synthesis network. Without CUDA: a
correctness-only pass under Triton's CPU interpreter. Both check every triton result against the reference:
exit 0 when all agree, 1 (with a FAIL line per case) when one does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ops", *sys.argv[1:]]))
