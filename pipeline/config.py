"""Typed configuration: schema, recipe loading, overrides and validation.

A recipe is a YAML file whose keys mirror the dataclasses below; it may name a `base:` recipe (a path relative
to the recipe's own folder) whose values it overrides. Command-line `key=value` overrides come last. Everything
is checked before any work starts: an unknown key, a value of the wrong type and a value out of range each raise
`ConfigError` with one line that names the key, the value and what is allowed.

The model and loss sections are family-specific: `family` picks their dataclasses from the family registry
(`pipeline.families`), as well as the family's optional `auto` rule and its cross-section checks.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml

from pipeline.augment.config import AugmentConfig
from pipeline.data.stream import StreamOptions
from pipeline.data.synth import LAYOUTS
from pipeline.errors import ConfigError, require
from pipeline.families import get_family
from pipeline.metrics.config import EvalConfig
from pipeline.schema import parse_section, section_dict


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _is_signal_name(name: str) -> bool:
    return isinstance(getattr(signal, f"SIG{name.upper().removeprefix('SIG')}", None), signal.Signals)


@dataclass
class SynthConfig:
    """The built-in procedurally drawn dataset, used when `data.url` is null."""

    n: int = 2000
    seed: int = 0
    layout: str = "grid"  # grid: small or large shapes at 3x3 places; centred: large shapes at the centre

    def validate(self, prefix: str) -> None:
        require(self.n > 0, f"{prefix}.n", self.n, "must be a positive number of images")
        require(self.layout in LAYOUTS, f"{prefix}.layout", self.layout, f"must be one of {', '.join(LAYOUTS)}")


@dataclass
class DataConfig(StreamOptions):
    """The data section. The streaming loader's own knobs (shuffle_buffer, resample, crop, max_bad_fraction,
    bad_check_min_samples, retries, retry_backoff_s, io_timeout_s, block_size, log_interval_s) are inherited
    from `StreamOptions`, which documents and validates them, so they are `data.*` keys too."""

    url: str | None = None  # shard folder with manifest.json (any fsspec URL); null = built-in synthetic set
    resolution: int = 256
    batch_size: int = 32  # images per optimizer step, summed over all ranks
    num_workers: int = 2
    xflip: bool = False
    cache_dir: str | None = None  # null = $GANPIPE_CACHE or ~/.cache/ganpipe
    synth: SynthConfig = field(default_factory=SynthConfig)

    def validate(self, prefix: str) -> None:
        require(
            _is_power_of_two(self.resolution) and self.resolution >= 8,
            f"{prefix}.resolution",
            self.resolution,
            "must be a power of two >= 8 (e.g. 32, 256, 1024)",
        )
        require(self.batch_size > 0, f"{prefix}.batch_size", self.batch_size, "must be a positive integer")
        require(self.num_workers >= 0, f"{prefix}.num_workers", self.num_workers, "must be >= 0")
        self.synth.validate(f"{prefix}.synth")
        super().validate(prefix)

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("GANPIPE_CACHE") or os.path.expanduser("~/.cache/ganpipe")


@dataclass
class OptimConfig:
    """Adam for G and D. The lazy-regularization correction of lr and betas is applied by the objective."""

    g_lr: float = 0.002
    d_lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8

    def validate(self, prefix: str) -> None:
        require(self.g_lr > 0, f"{prefix}.g_lr", self.g_lr, "must be > 0")
        require(self.d_lr > 0, f"{prefix}.d_lr", self.d_lr, "must be > 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{prefix}.betas",
            list(self.betas),
            "must be two numbers in [0, 1)",
        )
        require(self.eps > 0, f"{prefix}.eps", self.eps, "must be > 0")


@dataclass
class TrainConfig:
    total_kimg: float = 25000
    ema_kimg: float | None = None  # null = batch_size * 10 / 32, as in StyleGAN2-ADA
    ema_rampup: float | None = 0.05  # EMA half-life is at most this fraction of the images shown so far
    ema_start_kimg: float = 0  # G_ema is a copy of G until this many kimg (BigGAN-PyTorch's ema_start)
    precision: Literal["32", "bf16-mixed"] = "32"
    accelerator: str = "auto"
    devices: int = 1  # processes (GPUs) per node; under srun it must equal the tasks per node
    num_nodes: int = 1  # nodes; devices * num_nodes ranks share data.batch_size
    batch_gpu: int | None = None  # images per forward/backward on one rank (gradient accumulation); null = all
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # collectives: auto = NCCL on GPU, gloo on CPU
    strategy: Literal["phase_sync"] = "phase_sync"  # gradient sync across ranks (pipeline.train.strategy)
    sync_batchnorm: bool = False  # batch-norm statistics over all ranks (BigGAN-class models)
    compile: bool = False  # torch.compile G and D for the main phases (pipeline.train.compile; README "Performance")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False  # G's and D's 4-D weights in NHWC memory order (convolutions then prefer NHWC)
    requeue_signal: str | None = "USR1"  # Slurm's pre-timeout signal: checkpoint, requeue, exit; null = ignore it
    samples_every_kimg: float = 50
    checkpoint_every_kimg: float = 50
    keep_last: int = 3
    log_every_kimg: float = 4
    grid_rows: int = 4
    grid_cols: int = 8
    progress_bar: bool = True  # on a terminal; elsewhere (Slurm logs, pipes) one tick line per log_every_kimg

    @property
    def total_nimg(self) -> int:
        return round(self.total_kimg * 1000)

    def validate(self, prefix: str) -> None:
        require(self.total_kimg > 0, f"{prefix}.total_kimg", self.total_kimg, "must be > 0")
        require(
            self.ema_kimg is None or self.ema_kimg >= 0, f"{prefix}.ema_kimg", self.ema_kimg, "must be >= 0 or null"
        )
        require(
            self.ema_rampup is None or self.ema_rampup > 0,
            f"{prefix}.ema_rampup",
            self.ema_rampup,
            "must be > 0 or null",
        )
        require(self.ema_start_kimg >= 0, f"{prefix}.ema_start_kimg", self.ema_start_kimg, "must be >= 0")
        require(self.devices >= 1, f"{prefix}.devices", self.devices, "must be >= 1")
        require(self.num_nodes >= 1, f"{prefix}.num_nodes", self.num_nodes, "must be >= 1")
        require(
            self.batch_gpu is None or self.batch_gpu >= 1, f"{prefix}.batch_gpu", self.batch_gpu, "must be >= 1 or null"
        )
        require(
            self.requeue_signal is None or _is_signal_name(self.requeue_signal),
            f"{prefix}.requeue_signal",
            self.requeue_signal,
            "must be a signal name such as USR1, USR2 or null",
        )
        for name in ("samples_every_kimg", "checkpoint_every_kimg", "log_every_kimg"):
            value = getattr(self, name)
            require(value > 0, f"{prefix}.{name}", value, "must be > 0")
        require(self.keep_last >= 1, f"{prefix}.keep_last", self.keep_last, "must be >= 1")
        require(self.grid_rows >= 1, f"{prefix}.grid_rows", self.grid_rows, "must be >= 1")
        require(self.grid_cols >= 1, f"{prefix}.grid_cols", self.grid_cols, "must be >= 1")


@dataclass
class WandbConfig:
    project: str | None = None  # set to log to Weights & Biases (WANDB_MODE=offline works without an account)
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggerConfig:
    csv: bool = True  # RUN_DIR/logs/metrics.csv, appended to across resumes
    tensorboard: bool = False  # RUN_DIR/logs/tensorboard (scalars and sample grids); needs a run_dir on a file system
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class AutoConfig:
    """`auto.gpus`: size the run for this many GPUs with the family's `auto` rule (StyleGAN2: NVIDIA's cfg=auto);
    null = the rule is off."""

    gpus: int | None = None

    def validate(self, prefix: str) -> None:
        require(self.gpus is None or self.gpus >= 1, f"{prefix}.gpus", self.gpus, "must be a GPU count >= 1 or null")


@dataclass
class OpsConfig:
    impl: Literal["auto", "ref", "triton"] = "auto"  # 'ref' forces the pure-PyTorch ops everywhere


@dataclass
class Config:
    """One fully resolved experiment. `model` and `loss` hold the family's own dataclasses."""

    family: str = "stylegan2"
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    loss: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    auto: AutoConfig = field(default_factory=AutoConfig)  # the family's auto rule (StyleGAN2: NVIDIA's cfg=auto)
    init: str | None = None  # start a new run from these weights: export/convert folder, NVIDIA .pkl or checkpoint
    freeze_d: int = 0  # freeze D's first N layers from the input side, as NVIDIA's --freezed (transfer learning)

    def validate(self, prefix: str = "") -> None:
        """Every section, then the top-level keys and the family's cross-section rules. `prefix` is part of the
        section interface (`pipeline.schema.parse_section`); the top level has none."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate(f.name)
        require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        ranks = self.train.devices * self.train.num_nodes
        require(
            self.data.batch_size % ranks == 0,
            "data.batch_size",
            self.data.batch_size,
            f"must split evenly over the {ranks} ranks (train.devices={self.train.devices} x "
            f"train.num_nodes={self.train.num_nodes}): make it a multiple of {ranks}",
        )
        require(self.freeze_d >= 0, "freeze_d", self.freeze_d, "must be >= 0 (0 = train every D layer)")
        require(
            not self.logger.tensorboard or "://" not in self.run_dir or self.run_dir.startswith("file://"),
            "logger.tensorboard",
            self.logger.tensorboard,
            f"TensorBoard writes event files on a file system, and run_dir={self.run_dir!r} is not one: use a local "
            "or mounted run_dir, or logger.tensorboard=false",
        )
        family = get_family(self.family)
        if family.check_config is not None:
            family.check_config(self)  # rules across sections, e.g. StyleGAN2's float16 layers vs autocast

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of builtins (safe for JSON, YAML and `torch.load(weights_only=True)`)."""
        return section_dict(self)


@functools.cache
def _schema(family_name: str) -> type[Config]:
    """The Config dataclass with `model` and `loss` typed for one family (so OmegaConf can check them)."""
    family = get_family(family_name)
    model_cls, loss_cls = family.model_config, family.loss_config
    return dataclasses.make_dataclass(
        "Config",
        [
            ("model", model_cls, field(default_factory=model_cls)),
            ("loss", loss_cls, field(default_factory=loss_cls)),
        ],
        bases=(Config,),
    )


PACKAGED_RECIPES = Path(__file__).resolve().parent / "recipes"  # shipped with the package (`recipes/` in a clone)


def resolve_recipe(url: str) -> str:
    """`url` when it exists (or is remote); else the recipe shipped with ganpipe that it names, so
    `recipes/stylegan2/tiny.yaml` and `stylegan2/tiny` work from any directory after a plain `pip install`."""
    if "://" in url or os.path.exists(url):
        return url
    name = url.removeprefix("recipes/")
    for candidate in (name, f"{name}.yaml"):
        packaged = PACKAGED_RECIPES / candidate
        if packaged.is_file():
            return str(packaged)
    return url


def _read_yaml(url: str) -> dict[str, Any]:
    try:
        with fsspec.open(url, "r") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"recipe {url!r} does not exist: give the path of a YAML recipe, e.g. recipes/stylegan2/tiny.yaml"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {url!r} is not valid YAML{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {url!r} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(url: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe and its chain of `base:` recipes into one nested dict (child values win)."""
    if url in _seen:
        raise ConfigError(f"recipe {url!r} inherits from itself through 'base:' ({' -> '.join((*_seen, url))})")
    data = _read_yaml(url)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base={base!r} in {url!r} is invalid: give the path of another recipe")
    base_url = base if "://" in base or os.path.isabs(base) else os.path.join(os.path.dirname(url), base)
    return _deep_merge(load_recipe(base_url, (*_seen, url)), data)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` style command-line overrides to a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is invalid: write it as KEY=VALUE, e.g. data.batch_size=32")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key: write it as KEY=VALUE, e.g. data.batch_size=32")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def build_config(raw: dict[str, Any]) -> Config:
    """Merge a nested dict onto the family's schema, check types and ranges, return the typed Config."""
    family = raw.get("family", Config.family)
    if not isinstance(family, str):
        raise ConfigError(f"family={family!r} is invalid: give a family name such as 'stylegan2'")
    return parse_section(_schema(family), raw, "")


def auto_layer(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The keys the family's `auto` rule sets for the merged recipe dict `raw`, or None when `auto.gpus` is unset."""
    auto = raw.get("auto")
    if auto is None:
        return None
    if not isinstance(auto, dict):
        raise ConfigError(f"auto={auto!r} is invalid: it is a section, give it as auto.gpus=N")
    gpus = auto.get("gpus")
    if gpus is None:
        return None
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ConfigError(f"auto.gpus={gpus!r} is invalid: must be a GPU count >= 1 or null")
    family = get_family(str(raw.get("family", Config.family)))
    if family.derive_auto is None:
        raise ConfigError(f"auto.gpus is set but family {family.name!r} has no auto rule: remove auto.gpus")
    resolution = (raw.get("data") or {}).get("resolution", DataConfig.resolution)
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ConfigError(f"data.resolution={resolution!r} is invalid: must be a power of two >= 8")
    return family.derive_auto(resolution, gpus)


def load_config(recipe: str | None, overrides: list[str] | None = None) -> Config:
    """The one way to get a Config: recipe (with its bases), then the family's `auto` rule's keys when
    `auto.gpus` is set, then `key=value` overrides, then validation."""
    raw = load_recipe(resolve_recipe(recipe)) if recipe else {}
    over = parse_overrides(overrides or [])
    raw = _deep_merge(raw, over)
    derived = auto_layer(raw)
    if derived is not None:
        raw = _deep_merge(_deep_merge(raw, derived), over)
    return build_config(raw)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy stored in a checkpoint)."""
    return build_config(data)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


@dataclass
class SlurmProfile:
    """A cluster profile (`slurm/profiles/NAME.yaml`) for `ganpipe submit`: where and how a job runs.

    One task per GPU (`tasks_per_node` defaults to `gpus_per_node`; a CPU profile sets `tasks_per_node`).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU-only
    tasks_per_node: int | None = None  # null = gpus_per_node (one task per GPU)
    cpus_per_task: int = 8  # also the DataLoader/thread budget of each rank
    mem: str | None = None  # per node, sbatch syntax (e.g. 480G); null = the partition's default
    constraint: str | None = None
    time: str = "24:00:00"  # the wall-clock limit of one job (it requeues itself for more)
    signal: str = "USR1"  # sent `signal_seconds` before the time limit: checkpoint, requeue, exit
    signal_seconds: int = 300  # must cover one training step plus writing a checkpoint
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"  # auto = gpu when gpus_per_node > 0
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # collectives (auto = NCCL on GPU, gloo on CPU)
    modules: list[str] = field(default_factory=list)  # `module load` each, in order
    setup: list[str] = field(default_factory=list)  # shell lines run before training (activate an env, ...)
    env: dict[str, str] = field(default_factory=dict)  # exported before training
    container: str | None = None  # a container image for srun (pyxis: --container-image)
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts
    command: str | None = None  # how to run ganpipe on the nodes; null = the Python that runs `ganpipe submit`
    workdir: str | None = None  # where the job starts; null = the directory `ganpipe submit` ran in
    log_dir: str | None = None  # Slurm's stdout/stderr; null = RUN_DIR/slurm (RUN_DIR local) or ./slurm-logs
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` options, e.g. --exclusive
    srun_args: list[str] = field(default_factory=list)  # extra srun options, e.g. --cpu-bind=none

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)

    def validate(self, prefix: str) -> None:
        require(self.nodes >= 1, f"{prefix}.nodes", self.nodes, "must be >= 1")
        require(self.gpus_per_node >= 0, f"{prefix}.gpus_per_node", self.gpus_per_node, "must be >= 0")
        require(
            self.tasks_per_node is None or self.tasks_per_node >= 1,
            f"{prefix}.tasks_per_node",
            self.tasks_per_node,
            "must be >= 1 or null (= gpus_per_node)",
        )
        require(
            self.gpus_per_node == 0 or self.tasks_per_node in (None, self.gpus_per_node),
            f"{prefix}.tasks_per_node",
            self.tasks_per_node,
            f"must equal gpus_per_node={self.gpus_per_node} (one task per GPU) or be null",
        )
        require(self.cpus_per_task >= 1, f"{prefix}.cpus_per_task", self.cpus_per_task, "must be >= 1")
        require(
            re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", self.time) is not None,
            f"{prefix}.time",
            self.time,
            "must be a Slurm time such as 24:00:00, 2-00:00:00 or 90",
        )
        require(_is_signal_name(self.signal), f"{prefix}.signal", self.signal, "must be a signal name such as USR1")
        require(self.signal_seconds >= 1, f"{prefix}.signal_seconds", self.signal_seconds, "must be >= 1")
        require(
            self.mem is None or re.fullmatch(r"\d+[KMGT]?", str(self.mem)) is not None,
            f"{prefix}.mem",
            self.mem,
            "must be a Slurm size such as 64G or 0 (all of the node)",
        )
        require(
            not (self.accelerator == "gpu" and self.gpus_per_node == 0),
            f"{prefix}.accelerator",
            self.accelerator,
            "is gpu but gpus_per_node is 0: set gpus_per_node",
        )


def build_profile(raw: dict[str, Any], prefix: str = "profile") -> SlurmProfile:
    """A `SlurmProfile` from a profile's YAML mapping, checked like a recipe (unknown keys, types, ranges)."""
    return parse_section(SlurmProfile, raw, prefix)


__all__ = [
    "AugmentConfig",
    "AutoConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggerConfig",
    "OpsConfig",
    "OptimConfig",
    "SlurmProfile",
    "SynthConfig",
    "TrainConfig",
    "WandbConfig",
    "auto_layer",
    "build_config",
    "build_profile",
    "config_from_dict",
    "load_config",
    "load_recipe",
    "parse_overrides",
    "resolve_recipe",
    "to_yaml",
]
