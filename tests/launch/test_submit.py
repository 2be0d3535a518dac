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
        f"train {tmp_path / 'x'}/submitted/config-",
        "--resume auto",
    ]:
        assert line in script, line
    assert "srun --kill-on-bad-exit=1 --cpus-per-task=1 " in script
    # A dry run writes the config its script trains from (so `sbatch` on the printed script works), nothing else.
    (frozen,) = (tmp_path / "x" / "submitted").iterdir()
    assert f"train {frozen} --resume auto" in script
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["submitted"]


def test_module_and_setup_lines_fail_the_job_but_may_read_unset_variables(tmp_path) -> None:
    profile = tmp_path / "gpu.yaml"
    profile.write_text("gpus_per_node: 4\nmodules: [cuda/12.4]\nsetup: ['source ~/venv/bin/activate']\n")
    script = prepare(SubmitRequest(TINY_RECIPE, str(profile), [f"run_dir={tmp_path / 'x'}"])).script
    lines = script.splitlines()
    # A failing module load ends the job; unset variables are fatal only after the modules and setup lines.
    errexit, nounset = lines.index("set -eo pipefail"), lines.index("set -u")
    for line in ("module load cuda/12.4", "source ~/venv/bin/activate"):
        assert errexit < lines.index(line) < nounset
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in script
    assert "NCCL_ASYNC_ERROR_HANDLING=" not in script.replace("TORCH_NCCL_ASYNC_ERROR_HANDLING=", "")


def test_the_job_trains_from_the_config_frozen_at_submission(tmp_path) -> None:
    """Requeues read the frozen copy: what was submitted, with the `auto` rule applied once and not again."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {TINY_RECIPE}\nauto: {{gpus: 2}}\n")
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text("#!/bin/sh\necho 4242\n")
    fake_sbatch.chmod(0o755)
    sub = submit(SubmitRequest(str(recipe), "local", [f"run_dir={tmp_path / 'run'}", "data.batch_size=8"]),
                 sbatch=str(fake_sbatch))  # fmt: skip
    assert sub.job_id == "4242" and sub.frozen_config in sub.script
    recipe.write_text("this recipe was edited after submission: the job must not read it\n")
    frozen = load_config(sub.frozen_config)
    assert frozen.to_dict() == {**sub.config.to_dict(), "auto": {"gpus": None}}
    assert frozen.data.batch_size == 8 and frozen.train.devices == 2  # the override survives; the rule is not re-run


def test_launch_keys_come_from_the_profile_and_validate(tmp_path) -> None:
    sub = prepare(SubmitRequest(TINY_RECIPE, "local", ["run_dir=rel/run"], nodes=2))
    assert sub.config.train.num_nodes == 2 and sub.config.train.devices == 2
    assert sub.run_dir.startswith("/") and sub.run_dir.endswith("rel/run")  # stable: absolute, no timestamp
    assert load_config(TINY_RECIPE, []).train.accelerator == "auto"
    with pytest.raises(ConfigError, match="data.batch_size=6 is invalid: must split evenly over the 4 ranks"):
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
