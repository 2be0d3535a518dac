"""GANTask: the one training engine for every family (a LightningModule with manual optimization).

Each training step consumes one real batch and runs the family objective's phases that are due (e.g. Gmain, Greg,
Dmain, Dreg). A phase draws fresh latents, computes its loss with only its own network(s) trainable,
backpropagates (over `train.batch_gpu` accumulation rounds) and hands the gradients to the gradient-sync strategy
(`pipeline.train.strategy`: reduce over ranks, sanitise, step). After a step in which G changed, G_ema follows it.
Progress is counted in images shown (`cur_nimg`, reported in kimg), not in Lightning's global_step, which counts
optimizer steps.

What the engine takes from the family record (`pipeline.families`), and nothing else: the networks (G, D, the
family's further trained networks, frozen auxiliary networks), the objective, the conditioning (a batch's `c` for
the reals, the fakes' `c`, frozen encoders run on the device) and the sampler (sample grids).

`training_state()` / `load_training_state()` hold everything needed to continue bit-for-bit: networks, optimizers,
objective state, augmentation state (ADA's p and its pending sign sums), counters, RNG states and the data
position. The augmentation pipe (`cfg.augment`) is handed to every phase; after each step it may adjust p (ADA,
with the sign sums reduced over ranks) and its values are logged (`Augment/p`, `Augment/rt`).

Logging: each step's statistics (losses, penalties, scores, augmentation values) accumulate on the device; every
`train.log_every_kimg` they are logged as means over the steps since the last write, so the hot path has no host
sync and no per-step logging call.

Several ranks: gradients and buffers meet through the strategy; logged statistics are also means over ranks (one
collective per write); each rank draws its own latents and its RNG state is checkpointed per rank.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.augment import build_augment
from pipeline.config import Config
from pipeline.data.stream import StreamMonitor
from pipeline.errors import CheckpointError, ConfigError
from pipeline.families import get_family
from pipeline.models.conditioning import Cond, index_c
from pipeline.models.sampling import Sampler
from pipeline.objectives import Networks, Phase, PhaseInputs
from pipeline.train.compile import phase_context, prepare_networks
from pipeline.train.distributed import rank_seed
from pipeline.train.ema import ema_beta, update_ema
from pipeline.train.strategy import build_sync
from pipeline.train.transfer import freeze_discriminator

log = logging.getLogger(__name__)

PROGRESS_BAR_NAMES = {"Loss/G/loss": "loss_G", "Loss/D/loss": "loss_D"}  # shown beside kimg on a terminal


class GANTask(L.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        self.family = get_family(cfg.family)
        spec = self.family.spec(cfg.model, cfg.data.resolution, cfg)
        self.G = self.family.build_generator(spec)
        self.D = self.family.build_discriminator(spec)
        self.extra = nn.ModuleDict(self.family.build_extra(spec) if self.family.build_extra is not None else {})
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.objective = self.family.build_objective(cfg)
        self.conditioning = self.family.build_conditioning(spec)
        # Frozen networks (a loss's feature extractor, the conditioning's text encoder) are deliberately not
        # submodules: they stay out of state_dict, checkpoints, optimizers and the EMA. `on_fit_start` moves them.
        frozen = dict(self.family.build_frozen(cfg) if self.family.build_frozen is not None else {})
        frozen.update(self.conditioning.modules())
        self.frozen: dict[str, nn.Module] = {k: m.eval().requires_grad_(False) for k, m in frozen.items()}
        self.augment = build_augment(cfg.augment, getattr(cfg.model, "img_channels", 3))
        if cfg.freeze_d > 0:
            freeze_discriminator(self.D, cfg.freeze_d)
        self.net_names: list[str] = ["G", "D", *self.extra.keys()]
        self.phases: list[Phase] = self.objective.phases()
        unknown = sorted({n for p in self.phases for n in p.nets} - set(self.net_names))
        if unknown:
            raise ConfigError(f"family {cfg.family!r}: phases train {unknown}, which it does not build")
        # What each network trains, fixed now (after freeze_d): the phases toggle exactly these parameters.
        self._trainable = {n: [p for p in self.net(n).parameters() if p.requires_grad] for n in self.net_names}
        # After G_ema's copy, which stays eager and contiguous (sampling, evaluation and export use it).
        prepare_networks(cfg.train, self.objective, self.networks())
        self.sync = build_sync(cfg)
        self.z_dim: int = int(self.G.z_dim)

        self.cur_nimg = 0  # images shown, summed over ranks
        self.step_idx = 0  # training steps taken, one real batch each (drives the phase schedule)
        self.ema_nimg = 0  # images shown when G_ema last followed G
        self._pending_optimizer_states: list[dict[str, Any]] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._rng_ready = False  # this rank's RNG stream is set up (restored or seeded) before the first step
        self._batch_gpu: int | None = None  # checked once per fit (the world size is known then)
        self.preempted = False  # set when a preemption signal stopped training (pipeline.train.preemption)
        self._tick_time = time.perf_counter()
        self._tick_nimg = 0
        # Step statistics since the last logger write: running sums on the device and how many steps each has.
        self._stat_sums: dict[str, Tensor] = {}
        self._stat_counts: dict[str, int] = {}
        # Set by the data module: follows the stream's position and bad-data counters through consumed batches.
        self.data_monitor: StreamMonitor | None = None
        self.resume_data_state: dict[str, Any] | None = None  # the checkpoint's `data` entry, for the data module

    # ------------------------------------------------------------------------------------------------------------
    # Networks

    def net(self, name: str) -> nn.Module:
        """A trained network by name: G, D or one of the family's extras."""
        if name == "G":
            return self.G
        if name == "D":
            return self.D
        return self.extra[name]

    def trained_modules(self) -> list[nn.Module]:
        return [self.net(n) for n in self.net_names]

    def networks(self) -> Networks:
        return Networks(self.G, self.D, dict(self.extra.items()), self.frozen)

    def sampler(self) -> Sampler:
        """G_ema's sampler (sample grids, evaluation), with the task's conditioning (its encoder on the device)."""
        return self.family.make_sampler(self.G_ema, self.conditioning)

    # ------------------------------------------------------------------------------------------------------------
    # Setup

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def log_step(self) -> int:
        """The loggers' x of what is logged now: the step just taken (its scalars went out at this x), 0 before the
        first. Evaluations and sample grids use it so they line up with the losses of the same moment."""
        return max(self.step_idx - 1, 0)

    @property
    def batch_per_rank(self) -> int:
        return self.cfg.data.batch_size // self.world_size

    def on_fit_start(self) -> None:
        for module in self.frozen.values():  # the strategy has moved the submodules to the device by now
            module.to(self.device)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.sync.optimizers(self)

    def on_train_start(self) -> None:
        if self._pending_optimizer_states is not None:
            # The trainer's own optimizers, not the LightningOptimizer wrappers: loading into a wrapper would
            # replace its copy of the state and leave the real optimizer's untouched.
            self.sync.load_optimizer_state(self.trainer.optimizers, self._pending_optimizer_states)
            self._pending_optimizer_states = None
        if self.world_size > 1:
            self._check_ranks_agree()
        self.sync.setup(self)
        self._batch_gpu = self._check_batch_gpu()
        # The loggers' step is Lightning's count of batches, which restarts at 0 in every attempt (we resume from our
        # own checkpoints, not Lightning's); set it to ours, as Lightning's own resume would, so every logger's
        # x-axis continues across resumes and requeues.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.step_idx
        self._tick_time, self._tick_nimg = time.perf_counter(), self.cur_nimg

    def _check_ranks_agree(self) -> None:
        """Every rank must continue from the same checkpoint (each read the run dir on its own)."""
        counters = torch.tensor([self.cur_nimg, self.step_idx], dtype=torch.int64, device=self.device)
        gathered = self.all_gather(counters).reshape(-1, 2).cpu()
        if not (gathered == gathered[0]).all():
            raise CheckpointError(
                f"ranks resumed from different checkpoints (cur_nimg per rank: {gathered[:, 0].tolist()}): "
                "check that every node sees the same run_dir"
            )

    def _check_batch_gpu(self) -> int:
        """Images per forward/backward pass on this rank (`train.batch_gpu`, default the whole per-rank batch)."""
        per_rank = self.batch_per_rank
        batch_gpu = self.cfg.train.batch_gpu or per_rank
        if per_rank % batch_gpu != 0:
            raise ConfigError(
                f"train.batch_gpu={batch_gpu} does not divide the {per_rank} images per rank "
                f"(data.batch_size={self.cfg.data.batch_size} over {self.world_size} ranks): choose a divisor"
            )
        return batch_gpu

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    # ------------------------------------------------------------------------------------------------------------
    # Training step

    def draw_latents(self, phase: Phase, n: int, real_c: Cond) -> tuple[Tensor, Cond]:
        """Latents and conditioning of `phase`'s fakes on this rank's `n` images. `phase` lets a subclass pin
        latents per phase (the two-rank equivalence test does)."""
        gen_z = torch.randn([n, self.z_dim], device=self.device)
        return gen_z, self.conditioning.for_fakes(real_c)

    def _setup_rng(self) -> None:
        """Before the first step: restore this rank's saved RNG state, or give each rank its own stream.

        Done here, not at load time: Lightning's setup between load and the first step must not shift it.
        """
        saved, self._pending_rng = self._pending_rng, None
        world, rank = self.world_size, self.global_rank
        ranks = saved.get("ranks") if saved is not None else None
        if saved is not None and ranks is None and world == 1:
            set_rng_state(saved)
        elif ranks is not None and len(ranks) == world:
            set_rng_state(ranks[rank])
        elif world > 1:
            # Fresh start, or a checkpoint of another number of ranks: a new stream per rank (same seed everywhere
            # would draw the same latents on every rank).
            if saved is not None and rank == 0:
                log.info("checkpoint RNG states are for another number of ranks: reseeding %d ranks", world)
            torch.manual_seed(rank_seed(self.cfg.seed + self.cur_nimg, rank))
        self._rng_ready = True

    def _train_only(self, names: tuple[str, ...]) -> None:
        """Only the parameters of networks `names` take gradients (the others still pass gradients through)."""
        for name, params in self._trainable.items():
            on = name in names
            for p in params:
                p.requires_grad_(on)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._rng_ready:
            self._setup_rng()
        if self.data_monitor is not None and "stream" in batch:
            self.data_monitor.update(batch["stream"])
        real_img = batch["image"].to(torch.float32) / 127.5 - 1  # uint8 travels to the GPU; convert there
        real_c = self.conditioning.from_batch(batch, self.device)
        n = real_img.shape[0]
        optimizers = dict(zip(self.net_names, self._optimizers(), strict=True))
        chunk = self._batch_gpu or n
        stats: dict[str, Tensor] = {}
        g_stepped = False

        for phase in self.phases:
            if not phase.runs_at(self.step_idx):
                continue
            gen_z, gen_c = self.draw_latents(phase, n, real_c)
            opts = [optimizers[name] for name in phase.nets]
            self._train_only(phase.nets)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            # Gradient accumulation over rounds of `batch_gpu` images: each round's mean loss is weighted by its
            # share of the rank's batch, so the summed gradient is that of the whole batch's mean loss.
            with phase_context(phase):
                for start in range(0, n, chunk):
                    sl = slice(start, start + chunk)
                    inputs = PhaseInputs(
                        real_img[sl], index_c(real_c, sl), gen_z[sl], index_c(gen_c, sl), self.augment,
                        cur_nimg=self.cur_nimg, step=self.step_idx,
                    )  # fmt: skip
                    loss, phase_stats = self.objective.phase_loss(phase, self.networks(), inputs)
                    self.sync.backward(self, loss * (chunk / n) if chunk < n else loss)
                    for name, value in phase_stats.items():
                        weighted = value.detach() * (chunk / n)
                        stats[name] = stats[name] + weighted if name in stats and start > 0 else weighted
            self.sync.step(self, phase.nets, opts)
            g_stepped = g_stepped or "G" in phase.nets
        self._train_only(tuple(self.net_names))

        self.sync.end_step(self)  # before the EMA, which copies G's buffers into G_ema
        global_batch = n * self.world_size
        self.cur_nimg += global_batch
        if g_stepped:
            self._update_ema()
        if self.augment is not None:
            reduce = None
            if self.world_size > 1:  # every rank calls this each step, so the all-reduces match
                reduce = lambda x: self.trainer.strategy.reduce(x.to(self.device), reduce_op="sum")  # noqa: E731
            self.augment.end_step(self.step_idx, global_batch, reduce)
            stats.update(self.augment.log_values())
        self.step_idx += 1
        self._log_step(stats)

    def _update_ema(self) -> None:
        """G_ema follows G over the images shown since it last did (one step's batch when G trains every step)."""
        t = self.cfg.train
        ema_kimg = t.ema_kimg if t.ema_kimg is not None else self.cfg.data.batch_size * 10 / 32
        nimg = self.cur_nimg - self.ema_nimg
        started = self.cur_nimg >= t.ema_start_kimg * 1000  # BigGAN-PyTorch: itr >= ema_start, itr counted first
        update_ema(self.G_ema, self.G, ema_beta(nimg, ema_kimg, t.ema_rampup, self.ema_nimg) if started else 0.0)
        self.ema_nimg = self.cur_nimg

    def _log_step(self, stats: dict[str, Tensor]) -> None:
        """Add this step's statistics to running sums on the device (no host sync, no collective); on the loggers'
        steps (`Trainer.log_every_n_steps`, which `train.log_every_kimg` sets) write each one's mean over the steps
        since the last write that produced it, as a mean over ranks (one collective), with kimg, img/s, peak
        memory and the data counters, to the loggers at x = `log_step`.

        A statistic appears only in the rows of windows in which it was computed (R1 every 16 steps is not
        repeated in the rows between). That is why rows go to the loggers directly: Lightning's `self.log` keeps
        a key's last value and writes it again at every later logging step. `self.log` (logger=False) still
        feeds the progress bar and `trainer.callback_metrics` (the console's tick lines)."""
        for name, value in stats.items():
            v = value.detach().float().reshape(())
            self._stat_sums[name] = self._stat_sums[name] + v if name in self._stat_sums else v
            self._stat_counts[name] = self._stat_counts.get(name, 0) + 1
        if self.trainer is None or self.step_idx % max(self.trainer.log_every_n_steps, 1) != 0:
            return
        names = sorted(self._stat_sums)  # every rank ran the same phases: the same names, in this order
        means: list[float] = []
        if names:
            stacked = torch.stack([self._stat_sums[k] / self._stat_counts[k] for k in names]).to(self.device)
            if self.world_size > 1:
                stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
            means = stacked.cpu().tolist()  # the window's one host sync
        self._stat_sums, self._stat_counts = {}, {}
        row = {"kimg": self.cur_nimg / 1000, **dict(zip(names, means, strict=True))}
        now = time.perf_counter()
        dt, dn = now - self._tick_time, self.cur_nimg - self._tick_nimg
        if dt > 0 and dn > 0:
            row["Timing/img_per_sec"] = dn / dt
            row["Timing/sec_per_kimg"] = dt / (dn / 1000)
        row["Resources/peak_mem_gb"] = peak_memory_gb(self.device)
        self._tick_time, self._tick_nimg = now, self.cur_nimg
        totals = self._data_totals()
        if totals is not None:
            row.update(StreamMonitor.log_values(totals))
        if self.global_rank == 0:
            for logger in self.loggers:
                logger.log_metrics(row, step=self.log_step)
            for name, value in row.items():
                log = functools.partial(self.log, on_step=True, on_epoch=False, logger=False, rank_zero_only=True)
                log(name, value, prog_bar=name == "kimg")
                if name in PROGRESS_BAR_NAMES:
                    log(PROGRESS_BAR_NAMES[name], value, prog_bar=True)
        if totals is not None:
            self.data_monitor.check(totals)  # raises DatasetError; checkpoints and logs written so far stay

    def _data_totals(self) -> Tensor | None:
        """The data counters summed over ranks (every rank takes part, so every rank then decides the "too many
        bad samples" stop alike and none is left waiting in a collective); None without a stream monitor."""
        if self.data_monitor is None:
            return None
        totals = self.data_monitor.counters()
        if self.world_size > 1:
            totals = self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum").cpu()
        return totals

    # ------------------------------------------------------------------------------------------------------------
    # Exact resume

    def network_states(self) -> Iterator[tuple[str, dict[str, Tensor]]]:
        yield "G", self.G.state_dict()
        yield "D", self.D.state_dict()
        yield "G_ema", self.G_ema.state_dict()
        for name, module in self.extra.items():
            yield name, module.state_dict()

    def training_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and builtins only)."""
        return {
            "family": self.cfg.family,
            "config": self.cfg.to_dict(),
            **dict(self.network_states()),
            "extra_networks": list(self.extra.keys()),
            "objective": self.objective.state_dict(),
            "augment": self.augment.state_dict() if self.augment is not None else None,
            "optimizers": self.sync.optimizer_state(self.trainer.optimizers),
            "counters": {"cur_nimg": self.cur_nimg, "step_idx": self.step_idx, "ema_nimg": self.ema_nimg},
            "data": {"samples_seen": self.cur_nimg, "seed": self.cfg.seed, **self._data_state()},
            "rng": self._rng_state(),
        }

    def _data_state(self) -> dict[str, Any]:
        """`stream` (every rank's slot positions, gathered) and `counters` (summed) for the checkpoint."""
        if self.data_monitor is None:
            saved = self.resume_data_state or {}
            return {k: saved[k] for k in ("stream", "counters") if k in saved}
        positions, totals = self.data_monitor.positions(), self.data_monitor.counters()
        if self.world_size > 1:  # every rank calls this (see KimgCheckpoint.save), so the collectives match
            positions = self.all_gather(positions.to(self.device)).cpu()
            totals = self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum").cpu()
        return self.data_monitor.state_dict(positions, totals)

    def _rng_state(self) -> dict[str, Any]:
        """Rank 0's RNG state (as a single process stores it) plus, with several ranks, every rank's under `ranks`."""
        state = get_rng_state()
        if self.world_size > 1:  # every rank calls training_state (see KimgCheckpoint.save)
            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, state)
            state = {**ranks[0], "ranks": ranks}
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        saved_extra = state.get("extra_networks", [])
        if list(saved_extra) != list(self.extra.keys()):
            raise CheckpointError(
                f"the checkpoint trains the extra networks {list(saved_extra)} but this config builds "
                f"{list(self.extra.keys())}: resume with the model section it was trained with"
            )
        for name, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema), *self.extra.items()):
            module.load_state_dict(state[name])
        self.objective.load_state_dict(state["objective"])
        if self.augment is not None and state.get("augment") is not None:
            self.augment.load_state_dict(state["augment"])
        counters = state["counters"]
        self.cur_nimg = int(counters["cur_nimg"])
        self.step_idx = int(counters["step_idx"])
        self.ema_nimg = int(counters.get("ema_nimg", self.cur_nimg))  # older checkpoints: G_ema followed every step
        self._pending_optimizer_states = state["optimizers"]
        self._pending_rng = state["rng"]
        self.resume_data_state = state.get("data")


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX-only, so imported where it is needed

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
