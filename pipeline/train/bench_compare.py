"""Whole steps of the reference codebases, side by side with the engine: `ganpipe bench train RECIPE --compare
NAME=PATH` (see `pipeline.train.bench` for the benchmark itself).

    nvlabs=PATH          StyleGAN2 recipes: a checkout of https://github.com/NVlabs/stylegan2-ada-pytorch
    biggan-pytorch=PATH  BigGAN recipes: a checkout of https://github.com/ajbrock/BigGAN-PyTorch

None of the reference code is part of ganpipe: it is imported at run time from the checkout the user names, with
the checkout first on `sys.path` and its top-level module names (`training`, `torch_utils`, `utils`, `layers`, ...)
isolated from the process's own: modules of those names loaded before are put aside while the reference is
imported and its networks built, and restored after, when the checkout's modules leave `sys.modules` again (its
objects keep their own references). Nothing is written into the checkout (no bytecode). Third-party modules it
imports at top level but that play no part in a training step and are not installed (BigGAN-PyTorch's data stack:
`h5py`, ...; NVIDIA's `dnnlib`: `requests`, and `distutils` on Python 3.12+) get inert stand-ins for the import;
the report names them.

What is timed, per training step of the engine (one real batch of `data.batch_size` images; the same batches,
moved to the device the same way, at the same step indices, so lazy phases run equally often):

    nvlabs          NVIDIA's `training/loss.py` `StyleGAN2Loss.accumulate_gradients` for each of the recipe's
                    phases that is due (Gmain, Greg, Dmain, Dreg or Dboth, at the recipe's intervals), over the
                    `train.batch_gpu` rounds with gain = the phase's interval, around it the step of NVIDIA's
                    `training_loop.py` (which is one function that also builds datasets and loggers, so its step is
                    re-expressed here): fresh latents per phase, the phase's whole network made trainable and frozen
                    again, `nan_to_num` on its gradients, one Adam per network with the lazy-regularization-
                    corrected lr and betas, then G_ema's per-parameter lerp and buffer copy. Networks: its
                    `training/networks.py` Generator and Discriminator with the recipe's sizes and ganpipe's weights
                    (the names are NVIDIA's: a strict load). Ops: on the CPU its PyTorch reference implementations
                    (its CUDA plugins are never built); on CUDA whatever its own `_init` gives (the plugins it
                    compiles with ninja, or its fallback to the reference implementations); the report says which.
    biggan-pytorch  BigGAN-PyTorch's own step, `train_fns.GAN_training_function` (`num_D_steps` D steps on fresh
                    real batches through its `G_D` wrapper, hinge (or DCGAN) losses from `losses.py`, `utils.ortho`,
                    then the G step and `utils.ema`), one call per `loss.d_steps` engine steps, fed the same real
                    batches concatenated as its loader would. Networks: `BigGAN.py` (or `BigGANdeep.py`) with the
                    recipe's sizes and ganpipe's weights (names differ only in the batch norms' statistics).

Before anything is timed the reference's networks must compute what ganpipe's do: one batch through G (same z and
classes, constant noise) and D (the batch's reals), both in training mode as the steps run them, with every state
the pass changes (spectral-norm vectors, BN statistics, w_avg) restored afterwards. A largest absolute difference
above `MAX_ABS_DIFF` stops the benchmark with a one-line error: the comparison would not be like for like.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.util
import io
import logging
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.train.bench_timing import DATA, EMA, SYNC, PartTimer, SideRun
from pipeline.train.ema import ema_beta
from pipeline.train.strategy import lazy_adam_hparams

if TYPE_CHECKING:
    from pipeline.train.bench import BenchTask

MAX_ABS_DIFF = 1e-3  # largest |ganpipe - reference| accepted in the like-for-like check (float32 outputs)


# ----------------------------------------------------------------------------------------------------------------
# The request: --compare NAME=PATH


@dataclass(frozen=True)
class ReferenceKind:
    """A reference codebase `--compare` knows: the family it compares, where it comes from, what a checkout holds."""

    name: str
    family: str
    title: str
    repository: str
    required: tuple[str, ...]  # files a checkout must have (relative paths), checked before anything is built


REFERENCE_KINDS: dict[str, ReferenceKind] = {
    "nvlabs": ReferenceKind(
        "nvlabs",
        "stylegan2",
        "NVIDIA's StyleGAN2-ADA",
        "https://github.com/NVlabs/stylegan2-ada-pytorch",
        ("training/loss.py", "training/networks.py", "torch_utils/ops/bias_act.py", "dnnlib/__init__.py"),
    ),
    "biggan-pytorch": ReferenceKind(
        "biggan-pytorch",
        "biggan",
        "BigGAN-PyTorch",
        "https://github.com/ajbrock/BigGAN-PyTorch",
        ("train_fns.py", "BigGAN.py", "BigGANdeep.py", "losses.py", "utils.py", "layers.py"),
    ),
}


@dataclass(frozen=True)
class CompareRequest:
    """`--compare NAME=PATH` as given; `path` None when no path was given (the comparison is then skipped)."""

    name: str
    path: str | None

    @property
    def flag(self) -> str:
        return f"--compare {self.name}={self.path or ''}"


def parse_compare(value: str | None) -> CompareRequest | None:
    """`NAME=PATH`, `NAME=` or `NAME` (no path: skipped) -> a request; None -> None. An unknown NAME is a
    ConfigError listing the known ones."""
    if value is None:
        return None
    name, _, path = value.partition("=")
    name, path = name.strip(), path.strip()
    if name not in REFERENCE_KINDS:
        known = ", ".join(f"{k} ({v.family})" for k, v in REFERENCE_KINDS.items())
        raise ConfigError(f"--compare {value}: unknown reference {name!r}; choose one of {known}, as NAME=PATH")
    return CompareRequest(name, path or None)


def skip_line(family: str, request: CompareRequest | None) -> str:
    """The one line the report prints when there is nothing to compare with."""
    kinds = [k for k in REFERENCE_KINDS.values() if k.family == family]
    if request is not None:
        kind = REFERENCE_KINDS[request.name]
        return (
            f"Reference comparison: skipped (`--compare {kind.name}` without a path: give `--compare "
            f"{kind.name}=PATH` with PATH a checkout of {kind.repository})."
        )
    if not kinds:
        return f"Reference comparison: skipped (no reference codebase is known for the {family} family)."
    kind = kinds[0]
    return (
        f"Reference comparison: skipped (no `--compare`; `--compare {kind.name}=PATH` runs {kind.title} code from a "
        f"checkout of {kind.repository} side by side)."
    )


def check_request(request: CompareRequest, cfg: Config) -> Path:
    """The checkout of a request with a path, checked against the recipe before anything is built: the reference
    compares this family, the path is a local directory holding the reference's files, and the recipe uses nothing
    the reference step does not have. Every failure is a ConfigError naming the flag, the path and what was expected."""
    kind = REFERENCE_KINDS[request.name]
    flag = request.flag
    if cfg.family != kind.family:
        others = [k.name for k in REFERENCE_KINDS.values() if k.family == cfg.family]
        hint = f": use --compare {others[0]}=PATH" if others else " (no reference codebase is known for it)"
        raise ConfigError(f"{flag}: {kind.name} compares {kind.family} recipes, this one is {cfg.family}{hint}")
    assert request.path is not None
    if "://" in request.path:
        raise ConfigError(f"{flag}: the checkout must be a local directory (its code is imported), not a URL")
    checkout = Path(request.path).expanduser()
    expected = f"a checkout of {kind.repository} with {kind.required[0]}"
    if not checkout.exists():
        raise ConfigError(f"{flag}: {checkout} does not exist (expected {expected})")
    if not checkout.is_dir():
        raise ConfigError(f"{flag}: {checkout} is not a directory (expected {expected})")
    for relative in kind.required:
        if not (checkout / relative).is_file():
            raise ConfigError(f"{flag}: {checkout} has no {relative}: not a checkout of {kind.repository}")
    _check_recipe(flag, kind, cfg)
    return checkout.resolve()


def _check_recipe(flag: str, kind: ReferenceKind, cfg: Config) -> None:
    """What the reference step cannot reproduce, refused with the override that removes it."""
    refusals: list[tuple[bool, str]] = [
        (cfg.augment.kind != "none", f"the recipe augments D's inputs (augment.kind={cfg.augment.kind}); the "
         "comparison runs both sides without augmentation: add augment.kind=none"),
        (cfg.train.precision != "32", f"train.precision={cfg.train.precision}: the reference steps run in float32 "
         "(add train.precision=32)"),
        (cfg.freeze_d != 0, f"freeze_d={cfg.freeze_d}: the reference trains every D layer (add freeze_d=0)"),
    ]  # fmt: skip
    if kind.name == "biggan-pytorch":
        m = cfg.model
        refusals += [
            (m.c_dim == 0, "model.c_dim=0: BigGAN-PyTorch is class-conditional only"),
            (m.img_channels != 3, f"model.img_channels={m.img_channels}: BigGAN-PyTorch makes RGB images only"),
        ]
    for refused, why in refusals:
        if refused:
            raise ConfigError(f"{flag}: cannot compare like for like: {why}")


# ----------------------------------------------------------------------------------------------------------------
# Importing a checkout


class _StandIn(ModuleType):
    """An inert module for a missing third-party import: every attribute is an inert class."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, value)
        return value


def _top_level_names(checkout: Path) -> set[str]:
    """The module names a checkout defines at its top: `*.py` files and folders (packages or namespace packages)."""
    names = {p.stem for p in checkout.glob("*.py")}
    names |= {p.name for p in checkout.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is None
    except (ImportError, ValueError):
        return True


@contextlib.contextmanager
def _imports_from(checkout: Path, stand_ins: Sequence[str]) -> Iterator[list[str]]:
    """The checkout first on sys.path, its module names free (see the module docstring), stand-ins for the missing
    modules of `stand_ins` (dotted names); yields the stand-ins installed. Afterwards sys.path, sys.modules and
    `sys.dont_write_bytecode` are as before."""
    own = _top_level_names(checkout)
    put_aside = {n: m for n, m in sys.modules.items() if n.split(".")[0] in own}
    for name in put_aside:
        del sys.modules[name]
    installed: list[str] = []
    for dotted in stand_ins:
        if not _missing(dotted) and not isinstance(sys.modules.get(dotted.split(".")[0]), _StandIn):
            continue
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                module = _StandIn(name)
                module.__path__ = []  # a package: its submodules can be imported
                sys.modules[name] = module
                installed.append(name)
                if i > 1:
                    setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], module)
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.path.insert(0, str(checkout))
    try:
        yield [n for n in installed if n in stand_ins]
    finally:
        sys.dont_write_bytecode = bytecode
        with contextlib.suppress(ValueError):
            sys.path.remove(str(checkout))
        for name in [n for n in sys.modules if n.split(".")[0] in own or n in installed]:
            del sys.modules[name]
        sys.modules.update(put_aside)


def _import_all(flag: str, checkout: Path, names: Sequence[str]) -> dict[str, ModuleType]:
    modules: dict[str, ModuleType] = {}
    for name in names:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:  # whatever the foreign code raises on import: one line naming it
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise ConfigError(f"{flag}: importing {name} from {checkout} failed ({detail})") from None
    return modules


def checkout_commit(checkout: Path) -> str | None:
    """HEAD of the checkout when it is the top of a git work tree ('-dirty' when tracked files changed), else None."""
    try:

        def git(*args: str) -> str:
            done = subprocess.run(
                ["git", "-C", str(checkout), *args], check=True, capture_output=True, text=True, timeout=30
            )
            return done.stdout.strip()

        if Path(git("rev-parse", "--show-toplevel")).resolve() != checkout.resolve():
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class _Discard(io.TextIOBase):
    """stdout while reference code runs: its progress prints would land in the report."""

    def write(self, s: str) -> int:
        return len(s)


# ----------------------------------------------------------------------------------------------------------------
# References


@dataclass
class ComparisonInfo:
    """What the report says about the reference: where it came from, what was timed, the like-for-like check."""

    name: str
    title: str
    repository: str
    checkout: str
    commit: str | None
    timed: str  # what one reference step is
    ops: str
    check: dict[str, float]  # network -> largest |ganpipe - reference| of its outputs
    check_words: str  # how the check ran
    stand_ins: list[str] = field(default_factory=list)
    has_phases: bool = False  # the reference's steps are timed per phase (a column in the parts table)

    @classmethod
    def of(cls, kind: ReferenceKind, checkout: Path, **details: Any) -> ComparisonInfo:
        """The record of reference `kind` run from `checkout` (its commit read from git); `details`: the rest."""
        return cls(
            name=kind.name,
            title=kind.title,
            repository=kind.repository,
            checkout=str(checkout),
            commit=checkout_commit(checkout),
            **details,
        )


def _mode_and_state(modules: Sequence[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """Restore the modules' tensors (parameters and buffers) and train/eval modes on exit."""

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        saved = [({k: v.detach().clone() for k, v in m.state_dict().items()}, m.training) for m in modules]
        try:
            yield
        finally:
            for m, (state, training) in zip(modules, saved, strict=True):
                m.load_state_dict(state)
                m.train(training)

    return restore()


def _max_abs(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.detach().float() - b.detach().float()).abs().max())


def _load(flag: str, net: nn.Module, state: dict[str, Tensor], what: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(" ".join(str(e).splitlines()[1:3]).split())[:300]
        raise ConfigError(f"{flag}: ganpipe's {what} weights do not fit the reference's {what} ({detail})") from None


class Reference(abc.ABC):
    """A reference codebase's training step on copies of the task's networks (built by the subclass from its
    current weights). `run` times `steps` engine-sized steps at step indices `first_step`.. on the pool's batches."""

    info: ComparisonInfo
    STAND_INS: tuple[str, ...] = ()  # third-party modules its imports need, given inert stand-ins when missing

    def __init__(self, request: CompareRequest, checkout: Path, task: BenchTask, check_batch: dict[str, Any]) -> None:
        """Import the checkout and build (`_build`) with its modules importable: NVIDIA's constructors pickle-check
        objects that name its modules. The process's own modules are back once the networks exist. `check_batch`
        (host memory, as the benchmark's batches) is what the like-for-like check runs."""
        self.kind = REFERENCE_KINDS[request.name]
        self.flag = request.flag
        self.checkout = checkout
        self.task = task
        self.check_batch = check_batch
        self.timer: PartTimer = task.timer
        self.device = task.timer.device
        self.batch = task.cfg.data.batch_size
        self.batch_gpu = task.cfg.train.batch_gpu or self.batch
        # Importing torch.utils.cpp_extension (NVIDIA's custom_ops) logs a CUDA_HOME note on machines without CUDA.
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            with _imports_from(checkout, self.STAND_INS) as stand_ins, warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # e.g. distutils, on Python 3.10-3.11
                mods = _import_all(self.flag, checkout, self.modules())
                self._build(mods, stand_ins)
        finally:
            cpp_log.setLevel(level)

    @abc.abstractmethod
    def modules(self) -> tuple[str, ...]:
        """The checkout's modules to import, by dotted name."""

    @abc.abstractmethod
    def _build(self, mods: dict[str, ModuleType], stand_ins: list[str]) -> None:
        """Networks, optimizers and step of the reference from the task's weights; the check; `self.info`."""

    def require_like_for_like(self, check: dict[str, float]) -> None:
        """Stop with a one-line ConfigError when an output differs by more than MAX_ABS_DIFF."""
        worst = max(check, key=lambda k: check[k])
        if not check[worst] <= MAX_ABS_DIFF:
            found = ", ".join(f"{k} {v:.3g}" for k, v in check.items())
            raise ConfigError(
                f"{self.flag}: refusing to compare: the reference's networks do not compute what ganpipe's do "
                f"(largest |ganpipe - reference| on one batch: {found}; the limit is {MAX_ABS_DIFF:g})"
            )

    def steps_per_call(self) -> int:
        """Engine steps one reference call covers (BigGAN-PyTorch: `loss.d_steps`); --steps must be a multiple."""
        return 1

    def run(self, pool: list[dict[str, Any]], first_step: int, steps: int, timed: bool) -> SideRun | None:
        if timed:
            self.timer.start_window()
        with contextlib.redirect_stdout(_Discard()):
            self._steps(pool, first_step, steps)
        return self.timer.stop_window("reference", first_step, steps) if timed else None

    def _to_device(self, host: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in host.items()}

    @abc.abstractmethod
    def _steps(self, pool: list[dict[str, Any]], first_step: int, steps: int) -> None: ...


class NVLabsReference(Reference):
    """NVIDIA's StyleGAN2-ADA loss and training-loop step (see the module docstring)."""

    STAND_INS = ("requests", "distutils.util")  # dnnlib's (distutils: Python 3.12+ without setuptools)

    def modules(self) -> tuple[str, ...]:
        return ("training.networks", "training.loss", "torch_utils.misc", "torch_utils.ops.bias_act",
                "torch_utils.ops.upfirdn2d", "torch_utils.ops.conv2d_gradfix")  # fmt: skip

    def _build(self, mods: dict[str, ModuleType], stand_ins: list[str]) -> None:
        task, checkout = self.task, self.checkout
        cfg, device = task.cfg, self.device
        networks, loss = mods["training.networks"], mods["training.loss"]
        self.misc = mods["torch_utils.misc"]
        self.ops = (mods["torch_utils.ops.bias_act"], mods["torch_utils.ops.upfirdn2d"])
        if device.type != "cuda":
            for op in self.ops:
                op._init = lambda: False  # its CUDA plugins: never built for a CPU run
        mods["torch_utils.ops.conv2d_gradfix"].enabled = False  # on torch >= 1.9 it falls back to this anyway

        m, res = cfg.model, cfg.data.resolution
        s, d = m.synthesis, m.discriminator
        g_kwargs = {
            "z_dim": m.z_dim, "c_dim": m.c_dim, "w_dim": m.w_dim, "img_resolution": res,
            "img_channels": m.img_channels,
            "mapping_kwargs": {"num_layers": m.mapping.num_layers, "lr_multiplier": m.mapping.lr_multiplier,
                               "w_avg_beta": m.mapping.w_avg_beta},
            "synthesis_kwargs": {"architecture": s.architecture, "channel_base": s.channel_base,
                                 "channel_max": s.channel_max, "num_fp16_res": s.num_fp16_res,
                                 "conv_clamp": s.conv_clamp},
        }  # fmt: skip
        d_kwargs = {
            "c_dim": m.c_dim, "img_resolution": res, "img_channels": m.img_channels, "architecture": d.architecture,
            "channel_base": d.channel_base, "channel_max": d.channel_max, "num_fp16_res": d.num_fp16_res,
            "conv_clamp": d.conv_clamp, "cmap_dim": d.cmap_dim,
            "mapping_kwargs": {"lr_multiplier": m.mapping.lr_multiplier},
            "epilogue_kwargs": {"mbstd_group_size": d.mbstd_group_size, "mbstd_num_channels": d.mbstd_num_channels},
        }  # fmt: skip
        try:
            G = networks.Generator(**g_kwargs)
            D = networks.Discriminator(**d_kwargs)
            G_ema = networks.Generator(**g_kwargs)
        except Exception as e:  # the recipe's sizes outside what NVIDIA's constructors accept
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise ConfigError(f"{self.flag}: NVIDIA's networks reject the recipe's sizes ({detail})") from None
        for net, ours, what in ((G, task.G, "G"), (D, task.D, "D"), (G_ema, task.G_ema, "G_ema")):
            _load(self.flag, net, ours.state_dict(), what)
        # As NVIDIA's training loop holds them: G and D in training mode without gradients, G_ema in eval mode.
        self.G = G.train().requires_grad_(False).to(device)
        self.D = D.train().requires_grad_(False).to(device)
        self.G_ema = G_ema.eval().requires_grad_(False).to(device)
        task.G.to(device)
        task.D.to(device)
        check = self._check()
        self.require_like_for_like(check)

        lc = cfg.loss
        self.loss = loss.StyleGAN2Loss(
            device=device, G_mapping=self.G.mapping, G_synthesis=self.G.synthesis, D=self.D, augment_pipe=None,
            style_mixing_prob=lc.style_mixing_prob, r1_gamma=lc.r1_gamma, pl_batch_shrink=lc.pl_batch_shrink,
            pl_decay=lc.pl_decay, pl_weight=lc.pl_weight,
        )  # fmt: skip
        o, objective = cfg.optim, task.objective
        self.opts: dict[str, torch.optim.Optimizer] = {}
        for name, net in (("G", self.G), ("D", self.D)):
            lr = objective.learning_rate(name, o)
            lr, betas = lazy_adam_hparams(lr, tuple(o.betas), objective.reg_interval(name))
            self.opts[name] = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=o.eps)
        self.nets = {"G": self.G, "D": self.D}
        self.phases = list(task.phases)
        self.cur_nimg = 0
        t = cfg.train
        self.ema_kimg = t.ema_kimg if t.ema_kimg is not None else self.batch * 10 / 32
        self.ema_rampup = t.ema_rampup
        on_cpu = "on the CPU its PyTorch reference implementations (its CUDA plugins are not built)"
        self.info = ComparisonInfo.of(
            self.kind,
            checkout,
            timed="its `training/loss.py` StyleGAN2Loss.accumulate_gradients for each phase that is due, with its "
            "training loop's step around it (per phase: fresh latents, the network made trainable, nan_to_num on "
            "the gradients, one Adam per network with the lazy-regularization lr/betas; then G_ema) on its "
            "`training/networks.py` G and D",
            ops=on_cpu if device.type != "cuda" else "not yet known (decided by its `_init` at the first step)",
            check=check,
            check_words="one batch through G (same z and classes, constant noise) and D (the batch's reals) in "
            "training mode",
            stand_ins=stand_ins,
            has_phases=True,
        )

    def _c(self, c: Tensor | None, n: int) -> Tensor:
        """NVIDIA's conditioning tensor: one-hot labels, or [n, 0] for an unconditional model."""
        return c if c is not None else torch.zeros([n, 0], device=self.device)

    def _check(self) -> dict[str, float]:
        task, device = self.task, self.device
        batch = self._to_device(self.check_batch)
        real = batch["image"].to(torch.float32) / 127.5 - 1
        n = real.shape[0]
        real_c = task.conditioning.from_batch(batch, device)
        z = torch.randn([n, task.z_dim], generator=torch.Generator().manual_seed(task.cfg.seed)).to(device)
        with _mode_and_state([task.G, task.D, self.G, self.D]), torch.no_grad():
            for net in (task.G, task.D, self.G, self.D):
                net.train()
            g_ours = task.G(z, real_c, noise_mode="const")
            g_ref = self.G(z, self._c(real_c, n), noise_mode="const")
            d_ours = task.D(real, real_c)
            d_ref = self.D(real, self._c(real_c, n))
        return {"G": _max_abs(g_ours, g_ref), "D": _max_abs(d_ours, d_ref)}

    def _steps(self, pool: list[dict[str, Any]], first_step: int, steps: int) -> None:
        timer, device, task = self.timer, self.device, self.task
        cond, rounds = task.conditioning, self.batch_gpu
        for step in range(first_step, first_step + steps):
            with timer.part(DATA):
                batch = self._to_device(pool[step % len(pool)])
            real_img = batch["image"].to(torch.float32) / 127.5 - 1
            n = real_img.shape[0]
            real_c_ours = cond.from_batch(batch, device)
            real_c = self._c(real_c_ours, n)
            for phase in self.phases:
                if not phase.runs_at(step):
                    continue
                timer.begin(phase.name)
                gen_z = torch.randn([n, task.z_dim], device=device)
                gen_c = self._c(cond.for_fakes(real_c_ours), n)
                (net_name,) = phase.nets
                net, opt = self.nets[net_name], self.opts[net_name]
                opt.zero_grad(set_to_none=True)
                net.requires_grad_(True)
                for start in range(0, n, rounds):
                    sl = slice(start, start + rounds)
                    self.loss.accumulate_gradients(
                        phase=phase.name, real_img=real_img[sl], real_c=real_c[sl], gen_z=gen_z[sl],
                        gen_c=gen_c[sl], sync=True, gain=phase.interval,
                    )  # fmt: skip
                net.requires_grad_(False)
                timer.end(phase.name)
                with timer.part(SYNC):
                    for p in net.parameters():
                        if p.grad is not None:
                            self.misc.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
                    opt.step()
            with timer.part(EMA), torch.no_grad():
                beta = ema_beta(n, self.ema_kimg, self.ema_rampup, self.cur_nimg)
                for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
                    p_ema.copy_(p.lerp(p_ema, beta))
                for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
                    b_ema.copy_(b)
            self.cur_nimg += n
        if device.type == "cuda":
            plugins = [op._plugin is not None for op in self.ops]
            self.info.ops = (
                "its CUDA plugins (bias_act, upfirdn2d)"
                if all(plugins)
                else "its PyTorch reference implementations (its CUDA plugins did not build: see its warning)"
                if not any(plugins)
                else "its CUDA plugin for " + ("bias_act" if plugins[0] else "upfirdn2d") + ", the reference for "
                "the other"
            )


def ganpipe_to_biggan_pytorch(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ganpipe BigGAN state dict -> BigGAN-PyTorch's names (the inverse of the biggan-pytorch converter's renaming):
    batch norms keep their statistics as `stored_mean`/`stored_var` beside the layer, the output BN's affine
    parameters are `gain`/`bias`, and there is no `num_batches_tracked`."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(".bn.num_batches_tracked"):
            continue
        if key in ("output_layer.0.bn.weight", "output_layer.0.bn.bias"):
            out["output_layer.0." + ("gain" if key.endswith("weight") else "bias")] = value
        elif key.endswith((".bn.running_mean", ".bn.running_var")):
            prefix, _, leaf = key.rpartition(".bn.")  # blocks.0.0.bn1 . running_mean
            out[f"{prefix}.stored_{leaf.removeprefix('running_')}"] = value
        else:
            out[key] = value
    return out


class BigGANPyTorchReference(Reference):
    """BigGAN-PyTorch's `train_fns.GAN_training_function` step (see the module docstring)."""

    STAND_INS = ("h5py", "PIL.Image", "tqdm", "torchvision.transforms", "torchvision.datasets.utils",
                 "torchvision.datasets")  # fmt: skip

    def _module_name(self) -> str:
        return "BigGANdeep" if self.task.cfg.model.architecture == "deep" else "BigGAN"

    def modules(self) -> tuple[str, ...]:
        return ("utils", "losses", "train_fns", self._module_name())

    def _build(self, mods: dict[str, ModuleType], stand_ins: list[str]) -> None:
        task, checkout = self.task, self.checkout
        cfg, device = task.cfg, self.device
        m, o, lc = cfg.model, cfg.optim, cfg.loss
        module_name = self._module_name()
        utils, losses, train_fns, model = mods["utils"], mods["losses"], mods["train_fns"], mods[module_name]
        if lc.kind == "ns":  # its DCGAN losses are the non-saturating ones; train_fns looks them up at each call
            losses.generator_loss, losses.discriminator_loss = losses.loss_dcgan_gen, losses.loss_dcgan_dis

        rounds = self.batch // self.batch_gpu
        k = lc.d_steps
        self.k = k

        def attention(resolutions: Sequence[int]) -> str:
            return "_".join(str(r) for r in resolutions) or "0"

        config: dict[str, Any] = vars(utils.prepare_parser().parse_args([]))  # its train.py's defaults
        config.update(
            model=module_name, resolution=cfg.data.resolution, n_classes=m.c_dim,
            G_ch=m.ch, D_ch=m.d_ch or m.ch, dim_z=m.z_dim, shared_dim=m.shared_dim, G_shared=True,
            hier=m.hier or m.architecture == "deep", G_depth=m.depth, D_depth=m.depth,
            G_attn=attention(m.g_attention), D_attn=attention(m.d_attention), BN_eps=m.bn_eps, SN_eps=m.sn_eps,
            num_G_SV_itrs=m.sn_itrs, num_D_SV_itrs=m.sn_itrs, G_init=m.init, D_init=m.init, skip_init=True,
            G_lr=o.g_lr, D_lr=o.d_lr, G_B1=o.betas[0], G_B2=o.betas[1], D_B1=o.betas[0], D_B2=o.betas[1],
            adam_eps=o.eps, batch_size=self.batch_gpu, G_batch_size=0, num_D_steps=k,
            num_D_accumulations=rounds, num_G_accumulations=rounds, G_ortho=lc.g_ortho, D_ortho=lc.d_ortho,
            toggle_grads=True, split_D=False, ema=True,
        )  # fmt: skip
        config["G_activation"] = utils.activation_dict[config["G_nl"]]
        config["D_activation"] = utils.activation_dict[config["D_nl"]]
        try:
            with contextlib.redirect_stdout(_Discard()):  # the constructors print layer and parameter counts
                G = model.Generator(**config)
                D = model.Discriminator(**config)
                G_ema = model.Generator(**{**config, "skip_init": True, "no_optim": True})
        except Exception as e:  # the recipe's sizes outside what BigGAN-PyTorch's constructors accept
            detail = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise ConfigError(f"{self.flag}: BigGAN-PyTorch's networks reject the recipe's sizes ({detail})") from None
        for net, ours, what in ((G, task.G, "G"), (D, task.D, "D"), (G_ema, task.G_ema, "G_ema")):
            _load(self.flag, net, ganpipe_to_biggan_pytorch(ours.state_dict()), what)
        # As its train.py: networks built, then moved (the optimizers hold the same parameters), then the EMA.
        self.G, self.D, self.G_ema = G.to(device), D.to(device), G_ema.to(device)
        task.G.to(device)
        task.D.to(device)
        check = self._check()
        self.require_like_for_like(check)

        t = cfg.train
        ema_kimg = t.ema_kimg if t.ema_kimg is not None else self.batch * 10 / 32
        per_g_step = self.batch * k  # images between two G steps: the decay of one G step, as the engine's
        decay = ema_beta(per_g_step, ema_kimg, None, 0)
        start_itr = math.ceil(t.ema_start_kimg * 1000 / per_g_step)
        with contextlib.redirect_stdout(_Discard()):
            ema = utils.ema(self.G, self.G_ema, decay, start_itr)
        GD = model.G_D(self.G, self.D)
        z_, y_ = utils.prepare_z_y(max(config["G_batch_size"], config["batch_size"]), self.G.dim_z, m.c_dim,
                                   device=str(device), fp16=False)  # fmt: skip
        self.state_dict: dict[str, Any] = {"itr": 0, "epoch": 0, "config": config}
        self.train_step = train_fns.GAN_training_function(self.G, self.D, GD, z_, y_, ema, self.state_dict, config)
        loss_words = "hinge" if lc.kind == "hinge" else "DCGAN (non-saturating)"
        self.info = ComparisonInfo.of(
            self.kind,
            checkout,
            timed=f"its `train_fns.GAN_training_function` ({k} D steps on fresh real batches through its `G_D`, "
            f"{loss_words} losses from `losses.py`, `utils.ortho` when on, the G step, `utils.ema`), one call per {k} "
            f"engine steps, on its `{module_name}.py` G and D",
            ops="PyTorch (it has no custom ops)",
            check=check,
            check_words="one batch through G (same z and classes) and D (the batch's reals) in training mode: one "
            "spectral-norm power iteration per layer, batch statistics in G's batch norms",
            stand_ins=stand_ins,
        )

    def steps_per_call(self) -> int:
        return self.k

    def _check(self) -> dict[str, float]:
        task, device = self.task, self.device
        batch = self._to_device(self.check_batch)
        real = batch["image"].to(torch.float32) / 127.5 - 1
        y = batch["label"]
        z = torch.randn([real.shape[0], task.z_dim], generator=torch.Generator().manual_seed(task.cfg.seed))
        z = z.to(device)
        with _mode_and_state([task.G, task.D, self.G, self.D]), torch.no_grad():
            for net in (task.G, task.D, self.G, self.D):
                net.train()
            g_ours, g_ref = task.G(z, y), self.G(z, self.G.shared(y))
            d_ours, d_ref = task.D(real, y), self.D(real, y)
        return {"G": _max_abs(g_ours, g_ref), "D": _max_abs(d_ours, d_ref)}

    def _steps(self, pool: list[dict[str, Any]], first_step: int, steps: int) -> None:
        timer, k = self.timer, self.k
        for call_first in range(first_step, first_step + steps, k):
            with timer.part(DATA):
                hosts = [self._to_device(pool[(call_first + j) % len(pool)]) for j in range(k)]
            # Its loader hands over k batches at once (batch_size * num_D_steps), already float in [-1, 1].
            x = torch.cat([h["image"] for h in hosts]).to(torch.float32) / 127.5 - 1
            y = torch.cat([h["label"] for h in hosts])
            self.state_dict["itr"] += 1
            self.G.train()
            self.D.train()
            self.G_ema.train()
            self.train_step(x, y)


def build_reference(request: CompareRequest, checkout: Path, task: BenchTask, check_batch: dict[str, Any]) -> Reference:
    """Import the checkout, build the reference's networks from the task's current weights, and check on
    `check_batch` that they compute what the task's do (ConfigError otherwise)."""
    if request.name == "nvlabs":
        return NVLabsReference(request, checkout, task, check_batch)
    return BigGANPyTorchReference(request, checkout, task, check_batch)


__all__ = [
    "MAX_ABS_DIFF",
    "REFERENCE_KINDS",
    "BigGANPyTorchReference",
    "CompareRequest",
    "ComparisonInfo",
    "NVLabsReference",
    "Reference",
    "ReferenceKind",
    "build_reference",
    "check_request",
    "checkout_commit",
    "ganpipe_to_biggan_pytorch",
    "parse_compare",
    "skip_line",
]
