"""A plain (non-editable) install finds its recipes and Slurm files from any directory: the wheel ships them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_wheel_install_runs_config_and_submit_outside_the_checkout(tmp_path: Path) -> None:
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy: setuptools leaves a build/ folder in the source, which a later build would reuse.
    source = tmp_path / "source"
    junk = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache")
    shutil.copytree(REPO, source, symlinks=True, ignore=junk)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("ganpipe-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                              env=env, cwd=elsewhere)  # fmt: skip

    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], capture_output=True,
                           text=True, env=env, cwd=elsewhere, check=True).stdout  # fmt: skip
    assert where.startswith(str(site)), where  # the installed copy, not the checkout
    for name in ("stylegan2/tiny", "recipes/stylegan2/tiny.yaml"):
        config = cli("config", name)
        assert config.returncode == 0, config.stderr
        assert yaml.safe_load(config.stdout)["data"]["resolution"] == 32
    # `submit` with the packaged template, profile and recipe (a stand-in sbatch accepts the job).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 77\n")
    (bin_dir / "sbatch").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    submit = cli("submit", "recipes/stylegan2/ffhq256.yaml", "--profile", "local")
    assert submit.returncode == 0 and "submitted job 77" in submit.stdout, submit.stderr
    (script,) = (elsewhere / "runs" / "ffhq256" / "slurm").glob("*.sbatch")
    assert "#SBATCH --requeue" in script.read_text()
    (frozen,) = (elsewhere / "runs" / "ffhq256" / "submitted").glob("config-*.yaml")
    assert yaml.safe_load(frozen.read_text())["data"]["resolution"] == 256  # the packaged recipe, resolved
    missing = cli("config", "stylegan2/nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
