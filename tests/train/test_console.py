"""What `ganpipe train` prints when nobody watches a terminal (a Slurm log, a pipe): one tick line per
`train.log_every_kimg`, our own messages, and none of Lightning's INFO lines, notices or advertisements."""

from __future__ import annotations

import re
import subprocess
import sys

from pipeline.train.run import warn_cpu_ranks
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE


def test_a_run_without_a_terminal_prints_tick_lines_and_no_lightning_chatter(tmp_path) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", "train", TINY_RECIPE, *FAST_OVERRIDES, "train.progress_bar=true",
           "train.total_kimg=0.032", "train.log_every_kimg=0.008", f"run_dir={tmp_path / 'run'}",
           f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)  # pipes: not a terminal
    assert proc.returncode == 0, proc.stderr[-3000:]
    ticks = [line for line in proc.stdout.splitlines() if line.startswith("tick ")]
    assert [line.split()[2] for line in ticks] == ["0.008", "0.016", "0.024", "0.032"]
    pattern = r"tick kimg [\d.]+  img/s [\d.]+  s/kimg [\d.]+  G -?[\d.]+  D -?[\d.]+  peak_mem [\d.]+ GB  bad 0.00%"
    assert all(re.fullmatch(pattern, line) for line in ticks[1:]), ticks
    everything = proc.stdout + proc.stderr
    for chatter in ("GPU available", "TPU available", "Tip:", "litlogger", "srun", "module(s) in eval mode",
                    "`Trainer.fit` stopped", "LeafSpec", "it/s]"):  # fmt: skip
        assert chatter not in everything, chatter
    # No line twice (Lightning's INFO lines came once through its handler and once through ours); the sample grid
    # of 0 kimg is written again at the end of this sub-kimg run, under its kimg-named file.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "wrote sample grid" not in line]
    assert len(lines) == len(set(lines)), "a line printed twice"
    assert "saved checkpoint" in proc.stderr and "wrote sample grid" in proc.stderr  # our own messages stay


def test_several_ranks_on_cpu_are_warned_about(make_config, caplog) -> None:
    assert warn_cpu_ranks(make_config("train.devices=2", "train.accelerator=cpu"))
    assert "train.devices=2 on CPU: 2 processes share this machine's" in caplog.text
    assert not warn_cpu_ranks(make_config("train.devices=1", "train.accelerator=cpu"))
