"""kill -9 while a checkpoint is written never leaves a checkpoint that `--resume auto` picks and fails to load.

`ganpipe train` runs in a subprocess whose local file system SIGKILLs it at one chosen moment of the K-th
checkpoint write: halfway through the record or the checkpoint data, just before or just after either
rename. The same run dir is killed at every moment in turn, each run resuming (`--resume auto`) from what the
previous one left; after each kill every checkpoint under its real name must verify and load. The last run
finishes and must equal an uninterrupted run (exact resume after all that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import find_latest_checkpoint, read_record
from pipeline.train import list_checkpoints, load_checkpoint, train
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE

# Kill on the K-th checkpoint write of a run (K=1 also covers "no checkpoint yet": --resume auto starts fresh).
MOMENTS = [
    ("ckpt-mid", 2),
    ("record-mid", 1),
    ("ckpt-before-rename", 2),
    ("record-before-rename", 2),
    ("record-after-rename", 2),
    ("ckpt-after-rename", 1),
]
RUN = ["train.total_kimg=0.096", "train.checkpoint_every_kimg=0.016", "train.keep_last=3", "loss.d_reg_interval=2"]


DRIVER = """
import os, signal, sys
from fsspec.implementations.local import LocalFileSystem

kind, k = os.environ["GANPIPE_TEST_KILL"].split(":")
k = int(k)
seen = {"records": 0}


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def target(path):
    name = os.path.basename(str(path))
    if not (name.startswith(".ckpt-") and ".tmp-" in name):
        return None
    return "record" if ".json.tmp-" in name else "ckpt"


orig_open, orig_mv = LocalFileSystem._open, LocalFileSystem.mv


def _open(self, path, mode="rb", *args, **kwargs):
    f = orig_open(self, path, mode, *args, **kwargs)
    t = target(path)
    if "w" in mode and t == "record":
        seen["records"] += 1
    if "w" in mode and t and seen["records"] == k and kind == t + "-mid":
        write = f.write

        def half_then_die(data):
            write(bytes(memoryview(data)[: max(len(data) // 2, 1)]))
            f.flush()
            die()

        f.write = half_then_die
    return f


def mv(self, path1, path2, *args, **kwargs):
    t = target(path1)
    hit = t is not None and seen["records"] == k
    if hit and kind == t + "-before-rename":
        die()
    out = orig_mv(self, path1, path2, *args, **kwargs)
    if hit and kind == t + "-after-rename":
        die()
    return out


LocalFileSystem._open, LocalFileSystem.mv = _open, mv
from pipeline.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _all_checkpoints_load(run_dir: str) -> list[int]:
    nimgs = []
    for url in list_checkpoints(run_dir):
        state = load_checkpoint(url)  # verifies size + sha256 against the record, then loads
        assert read_record(url) is not None, f"{url} has no record"
        nimgs.append(state["counters"]["cur_nimg"])
    return nimgs


def test_kill_during_checkpoint_write_never_leaves_a_bad_checkpoint(make_config, tmp_path: Path) -> None:
    run_dir = str(tmp_path / "killed")
    full = make_config(*RUN, f"run_dir={tmp_path / 'full'}")
    expected = load_checkpoint(train(full).checkpoint)  # also creates the dataset in the cache

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [*FAST_OVERRIDES, f"data.cache_dir={tmp_path / 'cache'}", *RUN, f"run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for kind, k in MOMENTS:
        cmd = [sys.executable, str(driver), "train", TINY_RECIPE, *overrides, "--resume", "auto"]
        proc = subprocess.run(cmd, env={**env, "GANPIPE_TEST_KILL": f"{kind}:{k}"}, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, f"{kind}:{k} was not killed: rc={proc.returncode}\n{proc.stderr}"
        nimgs = _all_checkpoints_load(run_dir)
        found = find_latest_checkpoint(run_dir)
        if nimgs:
            assert found is not None and found[1]["counters"]["cur_nimg"] == max(nimgs)
        else:
            assert found is None  # nothing written yet: --resume auto starts a new run

    result = train(make_config(*RUN, f"run_dir={run_dir}"), resume="auto")
    assert result.kimg == pytest.approx(0.096)
    leftovers = [p.name for p in Path(run_dir, "checkpoints").iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # the writes killed earlier left temporaries; the next run removed them
    final = load_checkpoint(result.checkpoint)
    for net in ("G_ema", "G", "D"):
        for key, value in expected[net].items():
            torch.testing.assert_close(final[net][key], value, rtol=0, atol=1e-5, msg=f"{net}.{key}")
