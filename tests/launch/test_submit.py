"""`ganpipe submit --dry-run`: the rendered sbatch script, profile lookup and one-line errors (no Slurm needed)."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, LaunchError
from pipeline.launch import SubmitRequest, prepare, submit
from pipeline.train.distributed import master_port
from tests.conftest import TINY_RECIPE


def test_dry_run_prints_a_complete_sbatch_script(capsys, tmp_path) -> None:
    assert main(["submit", TINY_RECIPE, "--profile", "local", f"run_dir={tmp_path / 'x'}", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash\n")
    for line in [
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@60",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path / 'x'}/slurm/%x-%j.out",
        "export MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 20000 ))",
        f"run_dir={tmp_path / 'x'}",
        "train.devices=2",
        "train.backend=gloo",
        "--resume auto",
    ]:
        assert line in script, line
    assert "srun " in script and " train " in script


def test_launch_keys_come_from_the_profile_and_validate(tmp_path) -> None:
    sub = prepare(SubmitRequest(TINY_RECIPE, "local", ["run_dir=rel/run"], nodes=2))
    assert sub.config.train.num_nodes == 2 and sub.config.train.devices == 2
    assert sub.run_dir.startswith("/") and sub.run_dir.endswith("rel/run")  # stable: absolute, no timestamp
    assert load_config(TINY_RECIPE, []).train.accelerator == "auto"
    with pytest.raises(ConfigError, match="data.batch_size=6 does not split over 4 ranks"):
        prepare(SubmitRequest(TINY_RECIPE, "local", ["data.batch_size=6"], nodes=2))
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*local"):
        prepare(SubmitRequest(TINY_RECIPE, "nope", []))
    with pytest.raises(ConfigError, match="CPU-only"):
        prepare(SubmitRequest(TINY_RECIPE, "local", [], gpus_per_node=8))


def test_bad_profile_is_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitionn: gpu\n")
    with pytest.raises(ConfigError, match="unknown config key .profile.partitionn.; did you mean profile.partition"):
        prepare(SubmitRequest(TINY_RECIPE, str(bad), []))
    bad.write_text("time: soon\n")
    with pytest.raises(ConfigError, match="profile.time='soon' is invalid"):
        prepare(SubmitRequest(TINY_RECIPE, str(bad), []))


def test_missing_sbatch_is_a_launch_error(tmp_path) -> None:
    with pytest.raises(LaunchError, match="not found.*--dry-run"):
        submit(SubmitRequest(TINY_RECIPE, "local", [f"run_dir={tmp_path}"]), sbatch="no-such-sbatch")


def test_master_port_is_stable_per_job_and_differs_between_jobs() -> None:
    assert master_port("123456") == master_port(123456) == 15000 + 123456 % 20000
    assert master_port(1001) != master_port(1002)
