"""A real single-node Slurm cluster (tools/slurm_local.sh) for the `slurm` tests, started once per session.

Without Slurm's packages the tests skip, except in CI (`CI=true`), where .ci/run installs them and a missing
cluster is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "tools" / "slurm_local.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment (SLURM_CONF, ...) for clients of a running single-node cluster."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        msg = f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurmctld slurmd munge"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"tools/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(Path(state) / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, text=True, timeout=120)
