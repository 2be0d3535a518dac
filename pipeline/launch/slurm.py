"""`ganpipe submit`: a recipe + a cluster profile -> an sbatch script -> a Slurm job that trains and requeues itself.

Contract
    * A profile is `slurm/profiles/NAME.yaml` (or `$GANPIPE_PROFILES/NAME.yaml`, or a path to a YAML file); its
      keys are `pipeline.config.SlurmProfile`, checked like a recipe (an unknown key or bad value is one line).
    * The recipe and overrides are resolved and validated before anything is submitted, with the launch keys set
      from the profile: `train.devices` (tasks per node), `train.num_nodes`, `train.accelerator`,
      `train.backend`, `train.requeue_signal`, and `run_dir` made absolute. `data.batch_size` must split evenly
      over the ranks.
    * The script (`slurm/train.sbatch.j2`, rendered with Jinja2) asks for one task per GPU, `--requeue`,
      `--signal=SIG@SECONDS`, `--open-mode=append` and logs under the log dir, exports the profile's environment
      and a MASTER_PORT derived from the job id, and runs `srun --cpus-per-task=N ganpipe train FROZEN --resume
      auto`. FROZEN is the resolved config (recipe, overrides and launch keys, with the `auto` rule already
      applied) written into the run dir at submission, `RUN_DIR/submitted/config-TIMESTAMP.yaml`: a requeue trains
      exactly what was submitted, even if the recipe file changed since. The run dir is fixed at submission, so a
      requeued job (and a resubmission of the same command, which freezes its own copy) continues it.
    * `submit(..., dry_run=True)` writes the frozen config (so the printed script can be submitted by hand) and
      returns the script without touching Slurm; otherwise it also writes the script (`LOG_DIR/NAME.sbatch`), runs
      `sbatch --parsable` and returns the job id. No `sbatch`, or Slurm refusing the job, raises `LaunchError` with
      one line.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import jinja2
import yaml

from pipeline.config import Config, SlurmProfile, build_profile, load_config, resolve_recipe
from pipeline.errors import ConfigError, LaunchError
from pipeline.storage import publish_atomic

PACKAGED_SLURM = Path(__file__).resolve().parents[1] / "slurm"  # shipped with the package (`slurm/` in a clone)
DEFAULT_TEMPLATE = PACKAGED_SLURM / "train.sbatch.j2"
PORT_BASE, PORT_SPAN = 15000, 20000  # as pipeline.train.distributed.master_port


def profile_dirs() -> list[Path]:
    """Where `--profile NAME` is looked up, in order: $GANPIPE_PROFILES (colon-separated), ./slurm/profiles, the
    profiles shipped beside this package."""
    dirs = [Path(p) for p in os.environ.get("GANPIPE_PROFILES", "").split(os.pathsep) if p]
    dirs += [Path.cwd() / "slurm" / "profiles", PACKAGED_SLURM / "profiles"]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_profile(name: str) -> Path:
    """The YAML file of profile `name` (a name, or a path to a .yaml file)."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"profile file {name!r} does not exist: give a profile name or a YAML file")
        return path
    for d in profile_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    known = ", ".join(available_profiles()) or "none"
    raise ConfigError(f"unknown profile {name!r}: choose one of {known} (slurm/profiles/NAME.yaml)")


def load_profile(name: str) -> tuple[str, SlurmProfile]:
    """(profile name, validated profile)."""
    path = find_profile(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"profile {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {str(path)!r} must be a mapping of keys to values")
    try:
        return path.stem, build_profile(raw, prefix="profile")
    except ConfigError as e:
        raise ConfigError(f"{e} (in {path})") from None


@dataclass
class SubmitRequest:
    recipe: str
    profile: str
    overrides: list[str]
    nodes: int | None = None
    gpus_per_node: int | None = None
    time: str | None = None
    job_name: str | None = None


@dataclass
class Submission:
    script: str
    run_dir: str
    log_dir: str
    job_name: str
    config: Config
    frozen_config: str  # where the resolved config is written at submission (the script trains from it)
    job_id: str | None = None
    script_path: str | None = None


def _is_local(url: str) -> bool:
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol in (None, "file", "local")


def _absolute(url: str, base: Path) -> str:
    if not _is_local(url):
        return url
    path = fsspec.core.split_protocol(url)[1]
    return str((base / path).resolve()) if not os.path.isabs(path) else path


def _apply_cli(profile: SlurmProfile, req: SubmitRequest) -> SlurmProfile:
    if req.nodes is not None:
        profile.nodes = req.nodes
    if req.gpus_per_node is not None:
        if profile.gpus_per_node == 0 and profile.accelerator == "cpu":
            raise ConfigError(
                f"--gpus-per-node {req.gpus_per_node}: profile {req.profile!r} is CPU-only; use a GPU profile"
            )
        profile.gpus_per_node = req.gpus_per_node
        profile.tasks_per_node = None  # one task per GPU
    if req.time is not None:
        profile.time = req.time
    profile.validate("profile")
    return profile


def _command(profile: SlurmProfile) -> str:
    if profile.command:
        return profile.command
    # The interpreter (and checkout) that runs `ganpipe submit`: right for a shared file system, no PATH needed.
    return shlex.join([sys.executable, "-m", "pipeline.cli"])


def prepare(req: SubmitRequest) -> Submission:
    """Resolve profile, recipe and overrides and render the sbatch script (nothing is written or submitted)."""
    name, profile = load_profile(req.profile)
    profile = _apply_cli(profile, req)
    workdir = Path(profile.workdir or os.getcwd()).resolve()
    accelerator = profile.accelerator if profile.accelerator != "auto" else ("gpu" if profile.gpus_per_node else "cpu")
    recipe = _absolute(resolve_recipe(req.recipe), workdir)

    # The user's overrides first, then what the profile decides (the launch keys must match the allocation).
    probe = load_config(recipe, req.overrides)
    run_dir = _absolute(probe.run_dir, workdir)
    launch = [
        f"run_dir={run_dir}",
        f"train.devices={profile.ntasks_per_node}",
        f"train.num_nodes={profile.nodes}",
        f"train.accelerator={accelerator}",
        f"train.backend={profile.backend}",
        f"train.requeue_signal={profile.signal}",
    ]
    overrides = [o for o in req.overrides if o.split("=", 1)[0] != "run_dir"] + launch
    cfg = load_config(recipe, overrides)  # validated: e.g. data.batch_size must split over the job's ranks

    job_name = req.job_name or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir.rstrip("/")).name) or "ganpipe"
    if profile.log_dir:
        log_dir = _absolute(profile.log_dir, workdir)
    elif _is_local(run_dir):
        log_dir = f"{run_dir.rstrip('/')}/slurm"
    else:
        log_dir = str(workdir / "slurm-logs")
    srun_args = list(profile.srun_args)
    if profile.container:
        srun_args.append(f"--container-image={profile.container}")
        if profile.container_mounts:
            srun_args.append(f"--container-mounts={','.join(profile.container_mounts)}")

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # The suffix keeps two submissions in the same second apart.
    frozen = f"{run_dir.rstrip('/')}/submitted/config-{stamp}-{uuid.uuid4().hex[:6]}.yaml"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    template = env.from_string(DEFAULT_TEMPLATE.read_text())
    script = template.render(
        profile_name=name,
        rendered_at=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        job_name=job_name,
        nodes=profile.nodes,
        tasks_per_node=profile.ntasks_per_node,
        gpus_per_node=profile.gpus_per_node,
        cpus_per_task=profile.cpus_per_task,
        mem=profile.mem,
        time=profile.time,
        partition=profile.partition,
        account=profile.account,
        qos=profile.qos,
        constraint=profile.constraint,
        signal=profile.signal.upper().removeprefix("SIG"),
        signal_seconds=profile.signal_seconds,
        log_dir=log_dir,
        sbatch_args=profile.sbatch_args,
        workdir=str(workdir),
        modules=profile.modules,
        setup=profile.setup,
        env=profile.env,
        port_base=PORT_BASE,
        port_span=PORT_SPAN,
        run_dir=run_dir,
        srun_args=srun_args,
        command=_command(profile),
        frozen_config=frozen,
    )
    return Submission(script, run_dir, log_dir, job_name, cfg, frozen)


def frozen_yaml(cfg: Config) -> str:
    """The config a submitted job trains from: everything resolved, the `auto` rule already applied (so it is not
    applied again over the values it produced, or over overrides given at submission)."""
    data = cfg.to_dict()
    data["auto"] = {"gpus": None}
    return yaml.safe_dump(data, sort_keys=False)


def submit(req: SubmitRequest, dry_run: bool = False, sbatch: str = "sbatch") -> Submission:
    """Render the job script and, unless `dry_run`, submit it with `sbatch`; see the module docstring."""
    sub = prepare(req)
    exe = shutil.which(sbatch)
    if exe is None and not dry_run:
        raise LaunchError(f"'{sbatch}' not found: run on a Slurm login node, or print the script with --dry-run")
    publish_atomic(sub.frozen_config, frozen_yaml(sub.config).encode())  # the script trains from it
    if dry_run:
        return sub
    assert exe is not None
    log_dir = Path(sub.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output; without it, no log
    script_path = log_dir / f"{sub.job_name}.sbatch"
    script_path.write_text(sub.script)
    result = subprocess.run([exe, "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise LaunchError(f"sbatch refused the job: {reason[-1] if reason else f'exit code {result.returncode}'}")
    sub.job_id = result.stdout.strip().split(";")[0]
    sub.script_path = str(script_path)
    return sub


def watch_hint(sub: Submission) -> dict[str, Any]:
    """Where to look once a job is submitted (printed by the CLI)."""
    log = f"{sub.log_dir}/{sub.job_name}-{sub.job_id}.out" if sub.job_id else f"{sub.log_dir}/{sub.job_name}-JOBID.out"
    return {"squeue": f"squeue -j {sub.job_id}" if sub.job_id else "squeue --me", "log": log}
