"""The data benchmark runs end to end on a small set and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.data.bench import format_table, run_bench

REPO = Path(__file__).resolve().parents[2]


def test_bench_table() -> None:
    rows = run_bench(n=96, resolution=32, workers=(1,), batch_size=8, repeats=1, per_shard=16)
    assert len(rows) == 1 and rows[0].loader_img_s > 0 and rows[0].bare_img_s > 0
    table = format_table(rows, 32, 90, 96)
    assert "| workers | loader img/s | bare decode img/s | ratio | loader img/s per worker |" in table


def test_bench_script_exits_0() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/bench_data.py", "--n", "64", "--resolution", "32", "--workers", "1", "--repeats", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
