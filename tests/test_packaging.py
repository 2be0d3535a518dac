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
    submit = cli("submit", "recipes/stylegan2/ffhq256.yaml", "--profile", "local", "--dry-run")
    assert submit.returncode == 0, submit.stderr
    assert f"{site}/pipeline/recipes/stylegan2/ffhq256.yaml" in submit.stdout and "#SBATCH --requeue" in submit.stdout
    missing = cli("config", "stylegan2/nope")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
