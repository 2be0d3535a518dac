"""Benchmark whole training steps: the engine (GANTask under Lightning) against a bare loop of the same phases (see
pipeline/train/bench.py).

    python tools/bench_train.py RECIPE [KEY=VALUE ...] [--steps N] [--warmup W] [--repeats R] [--device cpu|cuda]
                                [--callbacks] [--compare nvlabs=PATH | biggan-pytorch=PATH]
    python tools/bench_train.py recipes/biggan/imagenet128.yaml data.batch_size=8 model.ch=32 --device cpu
    python tools/bench_train.py recipes/stylegan2/tiny.yaml data.resolution=64 data.batch_size=16 \
        --compare nvlabs=/tmp/stylegan2-ada-pytorch

Prints a markdown table (img/s, s/kimg, peak memory, time per phase, engine / bare ratio) and exits 0. With
`--compare`, the reference codebase's own training step runs as a third side from the checkout at PATH (imported at
run time, never copied; see pipeline/train/bench_compare.py), with engine / reference and bare / reference ratios.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
