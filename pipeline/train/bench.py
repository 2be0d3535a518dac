"""Whole-step training benchmark: what `ganpipe bench train` and `tools/bench_train.py` run.

    ganpipe bench train RECIPE [KEY=VALUE ...] [--steps N] [--warmup W] [--repeats R] [--device cpu|cuda]
                        [--callbacks] [--compare nvlabs=PATH | biggan-pytorch=PATH]

It builds the recipe's networks (any registered family; `key=value` overrides reduce widths or the batch) and
times training steps two ways, side by side in one process, on the same networks, optimizers and batches (and,
with `--compare`, a third way: the reference codebase's own step, below):

    engine  the real training engine: `GANTask.training_step` under the Lightning Trainer that
            `pipeline.train.run.build_trainer` makes (the recipe's precision, gradient-sync strategy and loggers,
            which write into a temporary run dir; wandb off), one process on `--device`; no checkpoint,
            sample-grid or evaluation callbacks unless `--callbacks` (checkpoints and sample grids at the recipe's
            intervals, into the temporary run dir)
    bare    the same work in a plain Python loop: for each phase due at the step, fresh latents and the fakes'
            conditioning, only the phase's networks trainable, `objective.phase_loss` over the same
            `train.batch_gpu` rounds, `loss.backward()`, `step()` of the same Adam optimizers; then G_ema's update
            (`update_ema`). No Lightning, no gradient sanitising, no logging, no augmentation bookkeeping.

Batches: `data.batch_size` random uint8 images (channels_last, as the stream hands them out) with what the family's
conditioning reads (`Conditioning.kind`): class labels drawn from its classes, or its prompts as captions through
its data-worker transform (`batch_transform`, e.g. the tokenizer). A few are made before timing and cycled; each
step moves its batch to the device (from pinned memory on CUDA). No dataset on disk.

    reference  (`--compare NAME=PATH`, `pipeline.train.bench_compare`) the reference codebase's own training step
            (NVIDIA's StyleGAN2-ADA loss and loop step for StyleGAN2 recipes; BigGAN-PyTorch's
            `train_fns.GAN_training_function` for BigGAN recipes), imported at run time from the checkout at PATH,
            on its own networks built with the recipe's sizes and loaded with the task's weights (checked to
            compute the same outputs first), its own optimizers and EMA, fed the same batches at the same step
            indices. Without a path the report says in one line that the comparison was skipped.

Schedule: W warm-up steps of each side (W >= 1 is raised until every phase has run once: a phase's first run pays
for its lazy setup, with `train.compile` for compiling its graphs), then R repeats of N engine steps and N bare
steps (and N reference steps), the order alternating between repeats (engine, bare, reference; then reversed: so
slow drift of the machine favours none). The bare loop (and the reference) replays the engine's step indices, so
lazily regularized phases (R1 every 16 steps, G every k-th step, ...) run equally often on every side; N defaults to
a multiple of every phase's interval. With `train.compile` a fourth side, eager, is the bare loop with every
compiled module called eagerly: the compiled bare loop against it is compile's speed-up. Each engine repeat is one
`Trainer.fit`; a step is timed from Lightning's `on_train_batch_start` to the next one, so it covers the whole loop
(batch transfer, training_step, callbacks, logger writes). Parts of a step are timed by marks around the engine's
own methods (`BenchTask`), which leave what they do unchanged; on CUDA every mark synchronizes the device, on both
sides alike.

Parts: each of the objective's phases by name (latents, forward and backward over the accumulation rounds: from
drawing its latents to its optimizer step); gradient sync + optimizer step of all phases (the engine's includes
the strategy's all-reduce, nothing in one process, and the non-finite-gradient sanitising); EMA of G; data wait
(the batch's transfer to the device); logging (the engine's `self.log` calls); callbacks (`on_train_batch_end`
hooks); and two remainders: the rest of the step body (engine: `training_step`'s image conversion, conditioning,
counters, augmentation bookkeeping; bare: the same conversion and the loop) and, engine only, the rest of
Lightning's loop (its hooks and the loggers' writes).

Figures: img/s, s/kimg and ms/step per side; engine / bare step-time ratio as the median of the repeats' ratios
(with their range), and with a reference engine / reference and bare / reference the same way; peak memory: on
CUDA `torch.cuda.max_memory_allocated` over each side's timed steps; on CPU the process's peak resident set (Linux:
VmHWM, reset before each side's steps through /proc/self/clear_refs; elsewhere ru_maxrss, which cannot be reset),
with its growth over the resident set when the steps began. A reference's networks and optimizers stay resident
through every side's steps (on CPU they count in every side's peak alike).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.models.conditioning import Cond, index_c
from pipeline.objectives import Phase, PhaseInputs
from pipeline.train.bench_timing import (
    BODY,
    CALLBACKS,
    DATA,
    EMA,
    LOGGING,
    MEMORY_LABELS,
    SYNC,
    PartTimer,
    SideRun,
    process_started_at,
)
from pipeline.train.callbacks import KimgCheckpoint, SampleGrid
from pipeline.train.compile import phase_context
from pipeline.train.console import quiet_lightning
from pipeline.train.ema import ema_beta, update_ema
from pipeline.train.run import _ops_impl, build_trainer
from pipeline.train.task import GANTask

if TYPE_CHECKING:
    from pipeline.train.bench_compare import CompareRequest, ComparisonInfo

POOL = 4  # distinct synthetic batches, cycled
MIN_STEPS = 8  # the default N is the phases' common period, repeated to at least this many steps

# ----------------------------------------------------------------------------------------------------------------
# The engine, with timing marks


class _TimedSync:
    """The task's gradient-sync strategy, unchanged, with marks: a phase ends where it calls `step`, and the step
    (all-reduce, sanitising, optimizer steps) is timed as its own part."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # everything but `step` is the strategy's own
        if name == "_inner":  # not yet set (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    def step(self, task: BenchTask, names: Sequence[str], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        task.timer.end(task.bench_phase)
        with task.timer.part(SYNC):
            self._inner.step(task, names, optimizers)
        if task.first_step_at is None:
            task.first_step_at = time.time()


class _CallbackMark(L.Callback):
    """First and last in the callback list: times the callbacks' `on_train_batch_end` hooks between them."""

    def __init__(self, timer: PartTimer, begin: bool) -> None:
        self.timer, self.begin = timer, begin

    def on_train_batch_end(self, *args: Any) -> None:
        if self.begin:
            self.timer.begin(CALLBACKS)
        else:
            self.timer.end(CALLBACKS)


class BenchTask(GANTask):
    """GANTask with timing marks around its own methods (what they do is unchanged), its optimizers kept across
    `Trainer.fit` calls (so Adam's state carries over between repeats, and the bare loop steps the same ones), and a
    window of steps to time in a fit: `window = N` times the fit's steps 0..N-1 and skips the rest of its batches."""

    def __init__(self, cfg: Config, timer: PartTimer) -> None:
        super().__init__(cfg)
        self.timer = timer
        self.sync = _TimedSync(self.sync)  # type: ignore[assignment]
        self.bench_phase = ""  # the phase in progress (for the sync's mark)
        self.window: int | None = None
        self.window_first_step = 0
        self.window_run: SideRun | None = None
        self.train_modes: dict[str, bool] = {}  # each submodule's mode while the engine trains
        self.bench_optimizers: list[torch.optim.Optimizer] | None = None
        self.first_step_at: float | None = None  # time.time() of the first optimizer step

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        if self.bench_optimizers is None:
            self.bench_optimizers = super().configure_optimizers()
        return self.bench_optimizers

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.window is None:
            return None
        if batch_idx == 0:
            self.train_modes = {name: m.training for name, m in self.named_modules()}
            self.window_first_step = self.step_idx
            self.timer.start_window()
        elif batch_idx == self.window:
            self.window_run = self.timer.stop_window("engine", self.window_first_step, self.window)
            return -1  # Lightning: skip the rest of the epoch (this batch included)
        return None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        with self.timer.part(DATA):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with self.timer.part(BODY):
            super().training_step(batch, batch_idx)

    def draw_latents(self, phase: Phase, n: int, real_c: Cond) -> tuple[torch.Tensor, Cond]:
        self.bench_phase = phase.name  # a phase begins by drawing its latents and ends at its sync step
        self.timer.begin(phase.name)
        return super().draw_latents(phase, n, real_c)

    def _update_ema(self) -> None:
        with self.timer.part(EMA):
            super()._update_ema()

    def _log_step(self, stats: dict[str, torch.Tensor]) -> None:
        with self.timer.part(LOGGING):
            super()._log_step(stats)


class _Batches:
    """`count` batches of the pool from position `first` on (a plain iterable with a length: Lightning's loader)."""

    def __init__(self, pool: list[dict[str, Any]], first: int, count: int) -> None:
        self.pool, self.first, self.count = pool, first, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.count):
            yield self.pool[(self.first + i) % len(self.pool)]


def synthetic_batches(task: GANTask, count: int, device: torch.device) -> list[dict[str, Any]]:
    """`count` batches as the stream hands them to the trainer, with what the family's conditioning reads."""
    cfg, cond = task.cfg, task.conditioning
    n, res = cfg.data.batch_size, cfg.data.resolution
    channels = int(getattr(cfg.model, "img_channels", 3))
    gen = torch.Generator().manual_seed(cfg.seed)
    transform = cond.batch_transform()
    batches = []
    for i in range(count):
        labels = torch.full((n,), -1, dtype=torch.int64)
        captions = [""] * n
        if cond.kind == "class":
            labels = torch.randint(0, int(cond.num_classes), (n,), generator=gen)  # type: ignore[attr-defined]
        elif cond.kind == "text":
            prompts = list(cond.prompts)  # type: ignore[attr-defined]
            captions = [prompts[(i * n + j) % len(prompts)] for j in range(n)]
        elif cond.kind != "none":
            raise ConfigError(
                f"family {cfg.family!r}: the benchmark cannot make batches for conditioning kind {cond.kind!r} "
                "(it knows none, class and text)"
            )
        image = torch.randint(0, 256, (n, res, res, channels), dtype=torch.uint8, generator=gen)
        batch: dict[str, Any] = {
            "image": image.permute(0, 3, 1, 2),  # [N, C, H, W] in channels_last memory, as the stream's
            "label": labels,
            "caption": captions,
            "key": [f"synthetic/{i:02d}/{j:05d}" for j in range(n)],
        }
        if transform is not None:
            batch = transform(batch)  # what the data workers do (e.g. captions -> token ids)
        batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        if device.type == "cuda":
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batches.append(batch)
    return batches


def _engine_fit(
    task: BenchTask, pool: list[dict[str, Any]], steps: int, timed: bool, callbacks: list[L.Callback]
) -> SideRun | None:
    """`steps` engine steps in one `Trainer.fit` (timed: one batch more, which closes the window and is skipped)."""
    timer = task.timer
    marks: list[L.Callback] = [_CallbackMark(timer, begin=True), *callbacks, _CallbackMark(timer, begin=False)]
    trainer = build_trainer(task.cfg, marks, task.sync)  # type: ignore[arg-type]
    task.window, task.window_run = (steps if timed else None), None
    try:
        trainer.fit(task, train_dataloaders=_Batches(pool, task.step_idx, steps + 1 if timed else steps))
    finally:
        task.window = None
        timer.open = False
    if timed and task.window_run is None:
        raise RuntimeError("the engine stopped before its timed steps were done")
    return task.window_run


def _bare_steps(
    task: BenchTask, pool: list[dict[str, Any]], first_step: int, steps: int, timed: bool, side: str = "bare"
) -> SideRun | None:
    """`steps` steps of the plain loop at step indices `first_step`.. (see the module docstring), timed as `side`."""
    cfg, t, timer, device = task.cfg, task.cfg.train, task.timer, task.timer.device
    assert task.bench_optimizers is not None, "the engine runs first: it makes the optimizers"
    # Lightning's teardown moved the networks and optimizer states to the CPU: back to the device, in the modes
    # the engine trained them in.
    task.to(device)
    _optimizers_to_device(task.bench_optimizers, device)
    for name, module in task.named_modules():
        module.training = task.train_modes.get(name, module.training)
    optimizers = dict(zip(task.net_names, task.bench_optimizers, strict=True))
    nets, objective, cond = task.networks(), task.objective, task.conditioning
    ema_kimg = t.ema_kimg if t.ema_kimg is not None else cfg.data.batch_size * 10 / 32
    autocast = t.precision == "bf16-mixed"

    if timed:
        timer.start_window()
    for step in range(first_step, first_step + steps):
        host = pool[step % len(pool)]
        with timer.part(DATA):
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in host.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            real_img = batch["image"].to(torch.float32) / 127.5 - 1
            real_c = cond.from_batch(batch, device)
            n = real_img.shape[0]
            chunk = t.batch_gpu or n
            g_stepped = False
            for phase in task.phases:
                if not phase.runs_at(step):
                    continue
                timer.begin(phase.name)
                gen_z = torch.randn([n, task.z_dim], device=device)
                gen_c = cond.for_fakes(real_c)
                task._train_only(phase.nets)
                opts = [optimizers[name] for name in phase.nets]
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                with phase_context(phase):
                    for start in range(0, n, chunk):
                        sl = slice(start, start + chunk)
                        inputs = PhaseInputs(
                            real_img[sl], index_c(real_c, sl), gen_z[sl], index_c(gen_c, sl), task.augment,
                            cur_nimg=task.cur_nimg, step=step,
                        )  # fmt: skip
                        loss, _ = objective.phase_loss(phase, nets, inputs)
                        (loss * (chunk / n) if chunk < n else loss).backward()
                timer.end(phase.name)
                with timer.part(SYNC):
                    for opt in opts:
                        opt.step()
                g_stepped = g_stepped or "G" in phase.nets
            task._train_only(tuple(task.net_names))
            if g_stepped:
                with timer.part(EMA):
                    beta = ema_beta(n, ema_kimg, t.ema_rampup, max(task.cur_nimg, n))
                    update_ema(task.G_ema, task.G, beta)
    return timer.stop_window(side, first_step, steps) if timed else None


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class BenchResult:
    recipe: str
    cfg: Config
    device: torch.device
    phases: list[Phase]
    params: dict[str, int]
    steps: int
    warmup: int
    repeats: int
    callbacks: bool
    engine: list[SideRun] = field(default_factory=list)
    bare: list[SideRun] = field(default_factory=list)
    memory_kind: str = ""
    started_at: float | None = None  # process start, time.time()
    built_at: float = 0.0  # networks built
    first_step_at: float | None = None  # the first optimizer step (engine, warm-up)
    load_before: float | None = None  # the 1-minute load average when the benchmark began (other processes)
    reference: list[SideRun] = field(default_factory=list)  # --compare: the reference codebase's steps
    eager: list[SideRun] = field(default_factory=list)  # train.compile: the bare loop with every module eager
    warmup_s: dict[str, float] = field(default_factory=dict)  # each side's warm-up steps, seconds
    comparison: ComparisonInfo | None = None  # --compare: what the reference is
    compare_skipped: str | None = None  # no comparison: the one line that says why

    @property
    def batch(self) -> int:
        return self.cfg.data.batch_size

    def side_runs(self, side: str) -> list[SideRun]:
        return {"engine": self.engine, "bare": self.bare, "reference": self.reference, "eager": self.eager}[side]

    def step_s(self, side: str) -> float:
        runs = self.side_runs(side)
        return sum(r.seconds for r in runs) / sum(r.steps for r in runs)

    @property
    def ratios(self) -> list[float]:
        """engine / bare step time of each repeat."""
        return self.ratios_between("engine", "bare")

    def ratios_between(self, side: str, other: str) -> list[float]:
        """side / other step time of each repeat (the two ran in the same repeat, alternating)."""
        pairs = zip(self.side_runs(side), self.side_runs(other), strict=True)
        return [a.step_s / b.step_s for a, b in pairs]

    @property
    def ratio(self) -> float:
        """engine / bare step time over all timed steps."""
        return self.step_s("engine") / self.step_s("bare")

    def parts_ms(self, side: str) -> dict[str, float]:
        """ms per step of each part, the remainders included (see `breakdown_rows`)."""
        runs = self.side_runs(side)
        steps = sum(r.steps for r in runs)
        total: defaultdict[str, float] = defaultdict(float)
        for r in runs:
            for name, s in r.parts.items():
                total[name] += s
        return {name: 1000 * s / steps for name, s in total.items()}

    def runs(self, side: str) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for r in self.side_runs(side):
            counts.update(r.runs)
        return dict(counts)

    def breakdown(self, side: str) -> list[tuple[str, float | None]]:
        """(part, ms per step) in table order; the measured parts, then the remainders. None: not on this side."""
        ms = self.parts_ms(side)
        step = 1000 * self.step_s(side)
        inner = [p.name for p in self.phases] + [SYNC, EMA, LOGGING]
        rows: list[tuple[str, float | None]] = [(p.name, ms.get(p.name, 0.0)) for p in self.phases]
        rows += [(SYNC, ms.get(SYNC, 0.0)), (EMA, ms.get(EMA, 0.0)), (DATA, ms.get(DATA, 0.0))]
        if side == "engine":
            body_rest = ms.get(BODY, 0.0) - sum(ms.get(k, 0.0) for k in inner)
            loop_rest = step - ms.get(BODY, 0.0) - ms.get(DATA, 0.0) - ms.get(CALLBACKS, 0.0)
            rows += [(LOGGING, ms.get(LOGGING, 0.0)), (CALLBACKS, ms.get(CALLBACKS, 0.0))]
            rows += [("body_rest", body_rest), ("loop_rest", loop_rest)]
        else:
            measured = sum(v for _, v in rows if v is not None)
            rows += [(LOGGING, None), (CALLBACKS, None), ("body_rest", step - measured), ("loop_rest", None)]
        return rows

    def outside_phases_ms(self) -> float:
        """How many ms per step more the engine spends than the bare loop outside the phases (sync and optimizer
        step, EMA, data, logging, callbacks, the rests): its machinery, without the phases' run-to-run noise."""
        phases = {p.name for p in self.phases}
        bare = dict(self.breakdown("bare"))
        return sum((ms or 0.0) - (bare[name] or 0.0) for name, ms in self.breakdown("engine") if name not in phases)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available: use --device cpu")
    return torch.device(device)


def default_steps(phases: Sequence[Phase]) -> int:
    """A multiple of every phase's interval (so each phase's share is its long-run share), at least MIN_STEPS."""
    period = math.lcm(*(p.interval for p in phases)) if phases else 1
    return period * max(1, math.ceil(MIN_STEPS / period))


def run_bench_train(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    steps: int | None = None,
    warmup: int = 2,
    repeats: int = 3,
    device: str | None = None,
    callbacks: bool = False,
    compare: str | None = None,
    progress: bool = True,
) -> BenchResult:
    """Run the benchmark (see the module docstring); `progress` prints a line per repeat to stderr. `compare` is
    `--compare`'s value (`NAME=PATH`): a bad name, a recipe of another family or a path that is not such a checkout
    is a ConfigError before any network is built."""
    from pipeline.train.bench_compare import check_request, parse_compare

    for flag, value, least in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value} must be >= {least}")
    request = parse_compare(compare)
    dev = resolve_device(device)
    load_before = None
    with contextlib.suppress(OSError, AttributeError):
        load_before = os.getloadavg()[0]
    quiet_lightning()
    with tempfile.TemporaryDirectory(prefix="ganpipe-bench-train-") as tmp:
        # One process on the chosen device, writing only into the temporary run dir; no progress bar, no wandb.
        forced = [
            f"run_dir={tmp}/run",
            "train.devices=1",
            "train.num_nodes=1",
            f"train.accelerator={'gpu' if dev.type == 'cuda' else 'cpu'}",
            "train.progress_bar=false",
            "logger.wandb.project=null",
        ]
        cfg = load_config(recipe, [*overrides, *forced])
        checkout = check_request(request, cfg) if request is not None and request.path is not None else None
        with _ops_impl(cfg.ops.impl):
            result = _run(recipe, cfg, dev, steps, warmup, repeats, callbacks, progress, request, checkout)
    result.load_before = load_before
    return result


def _run(
    recipe: str,
    cfg: Config,
    device: torch.device,
    steps: int | None,
    warmup: int,
    repeats: int,
    callbacks: bool,
    progress: bool,
    request: CompareRequest | None = None,
    checkout: Path | None = None,
) -> BenchResult:
    from pipeline.train.bench_compare import build_reference, skip_line

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    timer = PartTimer(device)
    task = BenchTask(cfg, timer)
    result = BenchResult(
        recipe=recipe,
        cfg=cfg,
        device=device,
        phases=list(task.phases),
        params={n: sum(p.numel() for p in task.net(n).parameters()) for n in task.net_names},
        steps=steps or default_steps(task.phases),
        warmup=warmup and max([warmup, *(p.offset + 1 for p in task.phases)]),
        repeats=repeats,
        callbacks=callbacks,
        started_at=process_started_at(),
        built_at=time.time(),
    )
    t = cfg.train
    extra: list[L.Callback] = []
    if callbacks:
        extra = [
            KimgCheckpoint(cfg.run_dir, t.checkpoint_every_kimg, t.keep_last),
            SampleGrid(cfg.run_dir, t.samples_every_kimg, t.grid_rows, t.grid_cols, seed=cfg.seed),
        ]
    pool = synthetic_batches(task, POOL, device)
    n = result.steps

    reference = None
    if request is not None and checkout is not None:
        t0 = time.perf_counter()
        # Building the reference's networks draws their initial weights: from a forked RNG, so the engine's and
        # the bare loop's latents are those of a run without --compare.
        # Eagerly under train.compile: the like-for-like check compares ganpipe's modules' own math, and graphs
        # compiled for its batch would be compile time outside the warm-up's count.
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.compiler.set_stance("force_eager"),
        ):
            reference = build_reference(request, checkout, task, pool[0])
        per_call = reference.steps_per_call()
        if n % per_call:
            raise ConfigError(
                f"{request.flag}: --steps {n} must be a multiple of loss.d_steps={per_call} (one call of the "
                f"reference's step is {per_call} engine steps)"
            )
        result.comparison = reference.info
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in reference.info.check.items())
        say(f"bench train: {request.name} reference built, max |ganpipe - reference| {diffs}: "
            f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    else:
        result.compare_skipped = skip_line(cfg.family, request)
    sides = ["engine", "bare"] + (["eager"] if cfg.train.compile else [])
    sides += ["reference"] if reference is not None else []

    def run_side(side: str, first: int, steps: int, timed: bool) -> None:
        if side == "engine":
            run = _engine_fit(task, pool, steps, timed, extra)
        elif side == "bare":
            run = _bare_steps(task, pool, first, steps, timed)
        elif side == "eager":  # the same loop with every compiled module called eagerly
            with torch.compiler.set_stance("force_eager"):
                run = _bare_steps(task, pool, first, steps, timed, side)
        else:
            assert reference is not None
            per_call = reference.steps_per_call()
            run = reference.run(pool, first, math.ceil(steps / per_call) * per_call, timed)
        if timed:
            assert run is not None
            result.side_runs(side).append(run)

    warmup = result.warmup
    if warmup:
        first = task.step_idx
        for side in sides:
            t0 = time.perf_counter()
            run_side(side, first, warmup, False)
            result.warmup_s[side] = time.perf_counter() - t0
        times = ", ".join(f"{side} {s:.1f} s" for side, s in result.warmup_s.items())
        say(f"bench train: warm-up, {warmup} steps per side: {times}")
    for r in range(repeats):
        first = task.step_idx
        for side in sides if r % 2 == 0 else sides[::-1]:
            run_side(side, first, n, True)
        e, b = result.engine[-1], result.bare[-1]
        line = (
            f"bench train: repeat {r + 1}/{repeats}: engine {1000 * e.step_s:.1f} ms/step, bare "
            f"{1000 * b.step_s:.1f} ms/step, ratio {e.step_s / b.step_s:.3f}"
        )
        if cfg.train.compile:
            line += f"; eager {1000 * result.eager[-1].step_s:.1f} ms/step"
        if reference is not None:
            ref = result.reference[-1]
            line += f"; {reference.kind.name} {1000 * ref.step_s:.1f} ms/step, engine / {reference.kind.name} " + (
                f"{e.step_s / ref.step_s:.3f}"
            )
        say(line)
    result.memory_kind = timer._memory[0]
    result.first_step_at = task.first_step_at
    return result


# ----------------------------------------------------------------------------------------------------------------
# The report


ROW_LABELS = {
    SYNC: "gradient sync + optimizer step",
    EMA: "EMA of G",
    DATA: "data wait (batch to device)",
    LOGGING: "logging (self.log)",
    CALLBACKS: "callbacks (on_train_batch_end)",
    "body_rest": "rest of the step body",
    "loop_rest": "Lightning loop, loggers (rest)",
}


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "−") + _ms(abs(value))


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}"


def _peak_cell(res: BenchResult, side: str) -> str:
    """A side's highest peak over its repeats, GiB, with its growth over the memory in use when its steps began."""
    run = max(res.side_runs(side), key=lambda r: r.peak_bytes)
    return f"{_gib(run.peak_bytes)} (+{_gib(max(run.peak_bytes - run.base_bytes, 0))})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _device_words(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"cpu ({cpu}; {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _phase_words(phases: Sequence[Phase]) -> str:
    parts = []
    for p in phases:
        if p.interval == 1:
            parts.append(p.name)
        else:
            parts.append(f"{p.name} (every {p.interval} steps)")
    return ", ".join(parts)


def _comparison_lines(res: BenchResult, info: ComparisonInfo, peak_label: str) -> list[str]:
    """The --compare section: where the reference came from, what was timed, the check, its figures and ratios."""
    from pipeline.train.bench_compare import MAX_ABS_DIFF

    name, r_s = info.name, res.step_s("reference")
    commit = f"commit {info.commit}" if info.commit else "commit unknown (not the top of a git work tree)"
    check = ", ".join(f"{k} {v:.2g}" for k, v in info.check.items())
    lines = [
        f"Side by side with {info.title} (`--compare {name}=PATH`):",
        "",
        f"- reference: {info.repository} at {commit}, imported from {info.checkout}",
        f"- timed: {info.timed}; ops: {info.ops}",
        f"- like-for-like check before timing ({info.check_words}): largest |ganpipe − reference| {check} (the limit "
        f"is {MAX_ABS_DIFF:g})",
    ]
    if info.stand_ins:
        lines.append(f"- inert stand-ins for modules it imports, a step does not use and are not installed: "
                     f"{', '.join(info.stand_ins)}")  # fmt: skip
    lines += [
        "",
        f"| | {name} | engine / {name} | bare / {name} |",
        "| --- | ---: | ---: | ---: |",
        f"| img/s | {res.batch / r_s:.1f} | | |",
        f"| s/kimg | {1000 * r_s / res.batch:.2f} | | |",
        f"| ms/step | {_ms(1000 * r_s)} | {res.step_s('engine') / r_s:.3f} | {res.step_s('bare') / r_s:.3f} |",
        f"| {peak_label} | {_peak_cell(res, 'reference')} | | |",
        "",
    ]
    words = []
    for side, label in (("engine", "engine"), ("bare", "bare loop")):
        ratios = res.ratios_between(side, "reference")
        median = statistics.median(ratios)
        words.append(
            f"{label} / {name} {median:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; {1 / median:.2f}x its img/s)"
        )
    lines += [
        f"Whole steps against {name}, medians of {_count(res.repeats, 'alternating repeat')}: {words[0]}; "
        f"{words[1]}. The ratios in the table are those of the mean step times.",
        "",
    ]
    return lines


def _compile_lines(res: BenchResult, peak_label: str) -> list[str]:
    """The train.compile section: the compiled bare loop against the same loop eager, and the compile time."""
    c_s, x_s = res.step_s("bare"), res.step_s("eager")
    ratios = res.ratios_between("eager", "bare")
    median = statistics.median(ratios)
    eager_phases = [p.name for p in res.phases if p.double_backward]
    if res.warmup:
        compile_s = res.warmup_s["engine"] - res.warmup * res.step_s("engine")
        compile_words = (
            f"Compile time: {compile_s:.1f} s, the engine's {_count(res.warmup, 'warm-up step')} (run first, every "
            f"phase once, so they compile every graph: {res.warmup_s['engine']:.1f} s with the Trainer's setup, "
            "about a second of it) less as many steady engine steps."
        )
    else:
        compile_words = "Compile time: not measured (--warmup 0: the first timed steps compiled the graphs)."
    return [
        f"`train.compile` (mode {res.cfg.train.compile_mode}): the bare loop compiled and the same loop with every "
        "module eager, alternating in the same repeats:",
        "",
        "| | compiled | eager | eager / compiled |",
        "| --- | ---: | ---: | ---: |",
        f"| img/s | {res.batch / c_s:.1f} | {res.batch / x_s:.1f} | |",
        f"| ms/step | {_ms(1000 * c_s)} | {_ms(1000 * x_s)} | {x_s / c_s:.3f} |",
        f"| {peak_label} | {_peak_cell(res, 'bare')} | {_peak_cell(res, 'eager')} | |",
        "",
        f"Speed-up from compiling: {median:.3f}x (median of {_count(len(ratios), 'repeat')}, range "
        f"{min(ratios):.3f}-{max(ratios):.3f}). {compile_words} "
        + (f"Eager in every mode: {', '.join(eager_phases)} (double backward)." if eager_phases else ""),
        "",
    ]


def format_report(result: BenchResult) -> str:
    cfg, res = result.cfg, result
    n_total = sum(r.steps for r in res.engine)
    e_s, b_s = res.step_s("engine"), res.step_s("bare")
    batch_gpu = cfg.train.batch_gpu or cfg.data.batch_size
    params = ", ".join(f"{k} {_millions(v)}" for k, v in res.params.items())
    when = datetime.date.today().isoformat()
    lines = [
        f"#### `ganpipe bench train {res.recipe}`: {cfg.family}, {cfg.data.resolution}x{cfg.data.resolution}, "
        f"batch {res.batch}",
        "",
        f"- networks: {params} parameters; phases: {_phase_words(res.phases)}; batch_gpu {batch_gpu}; precision "
        f"{cfg.train.precision}; ops {cfg.ops.impl}",
        f"- device: {_device_words(res.device)}; torch {torch.__version__}, lightning {L.__version__}; {when}"
        + ("" if res.load_before is None else f"; load average {res.load_before:.2f} before the benchmark"),
        f"- {_count(res.warmup, 'warm-up step')} per side, then {_count(res.repeats, 'repeat')} of "
        f"{_count(res.steps, 'step')} per side, alternating; callbacks: "
        f"{'checkpoints and sample grids' if res.callbacks else 'none'}",
    ]
    if res.started_at is not None and res.first_step_at is not None:
        lines.append(
            f"- time to the first optimizer step: {res.first_step_at - res.started_at:.1f} s from process start "
            f"(networks built at {res.built_at - res.started_at:.1f} s)"
        )
    ratios = res.ratios
    extra = res.outside_phases_ms()
    lo, hi = min(ratios), max(ratios)
    peak_label = MEMORY_LABELS.get(res.memory_kind, "peak memory, GiB")
    lines += [
        "",
        "| | engine | bare loop | engine / bare |",
        "| --- | ---: | ---: | ---: |",
        f"| img/s | {res.batch / e_s:.1f} | {res.batch / b_s:.1f} | |",
        f"| s/kimg | {1000 * e_s / res.batch:.2f} | {1000 * b_s / res.batch:.2f} | |",
        f"| ms/step | {_ms(1000 * e_s)} | {_ms(1000 * b_s)} | {e_s / b_s:.3f} |",
        f"| {peak_label} | {_peak_cell(res, 'engine')} | {_peak_cell(res, 'bare')} | |",
        "",
        f"Engine overhead: {100 * extra / (1000 * b_s):+.1f}% of the bare step ({_signed(extra)} ms/step): what the "
        "engine spends outside the phases beyond the bare loop (sync and optimizer step, data, logging, callbacks, "
        f"Lightning's loop). Whole steps, engine / bare: {statistics.median(ratios):.3f}, the median of "
        f"{_count(len(ratios), 'alternating repeat')} (range {lo:.3f}-{hi:.3f}; {res.ratio:.3f} from the means "
        "above); the phases run the same objective code on both sides, and the spread over repeats shows how "
        "noisy the machine is.",
        "",
    ]
    if res.eager:
        lines += _compile_lines(res, peak_label)
    info = res.comparison
    if info is not None:
        lines += _comparison_lines(res, info, peak_label=peak_label)
    elif res.compare_skipped is not None:
        lines += [res.compare_skipped, ""]
    ref_column = info is not None and info.has_phases
    # Further sides with a per-part column after the engine / bare columns: (header, side).
    columns = [("bare loop, eager", "eager")] if res.eager else []
    if ref_column and info is not None:
        columns.append((info.name, "reference"))
    column_rows = {side: dict(res.breakdown(side)) for _, side in columns}
    lines += [
        f"| part (ms per step, mean of {n_total} steps) | runs | engine | bare loop | engine − bare |"
        + "".join(f" {head} |" for head, _ in columns),
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(columns),
    ]
    engine_runs = res.runs("engine")
    bare_rows = dict(res.breakdown("bare"))
    for name, e_ms in res.breakdown("engine"):
        b_ms = bare_rows[name]
        label = ROW_LABELS.get(name, name)
        runs = str(engine_runs.get(name, 0)) if name not in ("body_rest", "loop_rest") else ""
        diff = _signed(e_ms - b_ms) if e_ms is not None and b_ms is not None else ""
        cells = "".join(f" {_ms(column_rows[side][name])} |" for _, side in columns)
        lines.append(f"| {label} | {runs} | {_ms(e_ms)} | {_ms(b_ms)} | {diff} |{cells}")
    lines.append(
        f"| **step** | {n_total} | **{_ms(1000 * e_s)}** | **{_ms(1000 * b_s)}** | {_signed(1000 * (e_s - b_s))} |"
        + "".join(f" **{_ms(1000 * res.step_s(side))}** |" for _, side in columns)
    )
    lines += [
        "",
        "A phase is its latents, forward and backward (from drawing its latents to its optimizer step), averaged "
        "over all steps; `runs` counts how often a part ran. The two rest rows are what the marks leave: "
        "training_step's (or the bare loop's) own code, and Lightning's loop with the loggers' writes."
        + (
            f" The {info.name} column times the reference's phases the same way (its `accumulate_gradients` calls "
            "with the latents and trainable toggles around them; its nan_to_num and Adam steps under gradient sync)."
            if ref_column and info is not None
            else ""
        ),
    ]
    uneven = [p for p in res.phases if res.steps % p.interval]
    if uneven:
        names = ", ".join(f"{p.name} (every {p.interval})" for p in uneven)
        lines.append(
            f"Note: {res.steps} steps is not a multiple of the interval of {names}: its share of the step differs "
            "from its long-run share; the default --steps is."
        )
    return "\n".join(lines)


__all__ = [
    "BenchResult",
    "BenchTask",
    "PartTimer",
    "SideRun",
    "default_steps",
    "format_report",
    "run_bench_train",
    "synthetic_batches",
]
