"""The `ganpipe` command end to end, as a user runs it (subprocesses, exit codes, one-line errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE

GANPIPE = [sys.executable, "-m", "pipeline.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GANPIPE, *args], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_train_then_resume_auto_via_cli(tmp_path: Path) -> None:
    common = [TINY_RECIPE, f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *FAST_OVERRIDES]
    first = run("train", *common, "train.total_kimg=0.016")
    assert first.returncode == 0, first.stderr
    assert "run dir:" in first.stdout and "(0.016 kimg" in first.stdout
    assert len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))) == 1
    again = run("train", *common, "train.total_kimg=0.032")
    assert again.returncode == 2 and "--resume auto" in again.stderr
    resumed = run("train", *common, "train.total_kimg=0.032", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "(0.032 kimg" in resumed.stdout
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000000000032.pt").exists()
    assert (tmp_path / "run" / "config.yaml").read_text().count("total_kimg: 0.032") == 1


def test_user_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    for args, needle in [
        (["train", str(tmp_path / "missing.yaml")], "does not exist"),
        (["export", str(tmp_path), "--out", str(tmp_path / "e")], "nor a run dir with checkpoints"),
        (["generate", str(tmp_path), "--out", str(tmp_path / "g.png")], "generator.json"),
        (["config", TINY_RECIPE, "data.url=" + str(tmp_path), "data.batch_size=0"], "data.batch_size=0"),
    ]:
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)


def test_data_synth_writes_shards_and_manifest(tmp_path: Path) -> None:
    proc = run(
        "data", "synth", "--out", str(tmp_path / "ds"), "--n", "12", "--resolution", "16", "--samples-per-shard", "5"
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
