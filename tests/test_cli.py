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
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data:\n  resolution: 32\n  batch_size: [1,\n")
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"\x80\x04\x95 a pickle of something else")
    (tmp_path / "images").mkdir()
    for args, needle in [
        (["train", str(tmp_path / "missing.yaml")], "does not exist"),
        (["export", str(tmp_path), "--out", str(tmp_path / "e")], "nor a run dir with checkpoints"),
        (["generate", str(tmp_path), "--out", str(tmp_path / "g.png")], "generator.json"),
        (["config", TINY_RECIPE, "data.url=" + str(tmp_path), "data.batch_size=0"], "data.batch_size=0"),
        (["config", str(bad_yaml)], "is not valid YAML at line 4, column 1: expected the node content"),
        (["config", TINY_RECIPE, "train.devices=3"], "data.batch_size=32 is invalid: must split evenly over the 3"),
        (["train", TINY_RECIPE, f"run_dir={tmp_path / 'r'}", "--resume", str(not_a_checkpoint)],
         "is not a ganpipe checkpoint (UnpicklingError: it holds something other than tensors"),
        (["data", "shards", str(tmp_path / "images"), "--out", str(tmp_path / "s"), "--layout", "nvlabs-zip",
          "--resolution", "32"], "--layout nvlabs-zip reads a dataset_tool .zip file, and"),
    ]:  # fmt: skip
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, proc.stderr)
        assert "weights_only" not in proc.stderr  # never torch's advice to load code from a file


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


def test_data_synth_centred_layout(tmp_path: Path) -> None:
    from pipeline.data import ShardDataset
    from pipeline.data.synth import LAYOUTS

    proc = run("data", "synth", "--out", str(tmp_path / "ds"), "--n", "6", "--resolution", "16", "--layout", "centred")
    assert proc.returncode == 0, proc.stderr
    captions = [ShardDataset(str(tmp_path / "ds"))[i]["caption"] for i in range(6)]
    assert all(c.startswith("a large ") and " at the center on a " in c for c in captions), captions
    help_text = run("data", "synth", "--help").stdout
    assert "{" + ",".join(LAYOUTS) + "}" in help_text  # the CLI offers exactly the dataset's layouts
