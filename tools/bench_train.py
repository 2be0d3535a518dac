"""Benchmark whole training steps: the engine (GANTask under Lightning) against a bare loop of the same phases (see
pipeline/train/bench.py).

    python tools/bench_train.py RECIPE [KEY=VALUE ...] [--steps N] [--warmup W] [--repeats R] [--device cpu|cuda]
    python tools/bench_train.py recipes/biggan/imagenet128.yaml data.batch_size=8 model.ch=32 --device cpu

Prints a markdown table (img/s, s/kimg, peak memory, time per phase, engine / bare ratio) and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
