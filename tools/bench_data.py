"""Benchmark the streaming data loader against a bare tar-read + decode loop (see pipeline/data/bench.py).

    python tools/bench_data.py [--n 4000] [--read 12000] [--workers 1,2] [--resolution 256] [--quality 90]

Prints a markdown table (loader img/s, bare decode img/s, ratio, img/s per worker) and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", *sys.argv[1:]]))
