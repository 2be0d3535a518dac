"""GANTask: the one training engine for every family (a LightningModule with manual optimization).

Each training step runs the family objective's phases in order (e.g. Gmain, Greg, Dmain, Dreg). A phase draws
fresh latents, computes its loss with only its own network trainable, backpropagates, sanitises non-finite
gradients and steps its network's optimizer. After the phases, G_ema follows G. Progress is counted in images
shown (`cur_nimg`, reported in kimg), not in Lightning's global_step, which counts optimizer steps.

`training_state()` / `load_training_state()` hold everything needed to continue bit-for-bit: networks,
optimizers, objective state, augmentation state (ADA's p and its pending sign sums), counters, RNG states and the
data position. The augmentation pipe (`cfg.augment`) is handed to every phase; after each step it may adjust p
(ADA, with the sign sums reduced over ranks) and its values are logged (`Augment/p`, `Augment/rt`).

Several ranks (`pipeline.train.distributed`): each phase's gradients are averaged over the ranks once, after its
last backward (and after `train.batch_gpu` accumulation rounds), before its optimizer step; running statistics
(buffers) are averaged after each step; logged losses are means over ranks; each rank draws its own latents and
its RNG state is checkpointed per rank.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment import build_augment
from pipeline.config import Config
from pipeline.data.stream import StreamMonitor
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import get_family
from pipeline.objectives import Phase, PhaseInputs, build_objective
from pipeline.train.distributed import BufferSync, all_reduce_gradients, rank_seed
from pipeline.train.ema import ema_beta, update_ema

log = logging.getLogger(__name__)


def lazy_adam_hparams(
    lr: float, betas: tuple[float, float], reg_interval: int | None
) -> tuple[float, tuple[float, float]]:
    """Adam lr/betas corrected for lazy regularization: the optimizer steps (k+1)/k as often per k batches."""
    if reg_interval is None:
        return lr, betas
    ratio = reg_interval / (reg_interval + 1)
    return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)


class GANTask(L.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.cfg = cfg
        family = get_family(cfg.family)
        self.G = family.build_generator(cfg.model, cfg.data.resolution)
        self.D = family.build_discriminator(cfg.model, cfg.data.resolution)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.objective = build_objective(cfg.family, cfg.loss)
        self.augment = build_augment(cfg.augment, getattr(cfg.model, "img_channels", 3))
        if cfg.freeze_d > 0:
            freeze_discriminator(self.D, cfg.freeze_d)
        self.phases: list[Phase] = self.objective.phases()
        self.c_dim: int = cfg.model.c_dim
        self.z_dim: int = cfg.model.z_dim

        self.cur_nimg = 0  # images shown, summed over ranks
        self.step_idx = 0  # training steps taken (drives the lazy-regularization schedule)
        self._pending_optimizer_states: list[dict[str, Any]] | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._rng_ready = False  # this rank's RNG stream is set up (restored or seeded) before the first step
        self._buffer_sync: BufferSync | None = None  # with several ranks: keeps running statistics equal
        self.preempted = False  # set when a preemption signal stopped training (pipeline.train.preemption)
        self._tick_time = time.perf_counter()
        self._tick_nimg = 0
        # Set by the data module: follows the stream's position and bad-data counters through consumed batches.
        self.data_monitor: StreamMonitor | None = None
        self.resume_data_state: dict[str, Any] | None = None  # the checkpoint's `data` entry, for the data module

    # ------------------------------------------------------------------------------------------------------------
    # Setup

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @property
    def batch_per_rank(self) -> int:
        return self.cfg.data.batch_size // self.world_size

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        o = self.cfg.optim
        optimizers = []
        for net, module, lr in (("G", self.G, o.g_lr), ("D", self.D, o.d_lr)):
            lr, betas = lazy_adam_hparams(lr, tuple(o.betas), self.objective.reg_interval(net))
            params = [p for p in module.parameters() if p.requires_grad]  # frozen D layers (freeze_d) never step
            optimizers.append(torch.optim.Adam(params, lr=lr, betas=betas, eps=o.eps))
        return optimizers

    def on_train_start(self) -> None:
        if self._pending_optimizer_states is not None:
            # The trainer's own optimizers, not the LightningOptimizer wrappers: loading into a wrapper would
            # replace its copy of the state and leave the real optimizer's untouched.
            for opt, state in zip(self.trainer.optimizers, self._pending_optimizer_states, strict=True):
                opt.load_state_dict(state)
            self._pending_optimizer_states = None
        if self.world_size > 1:
            self._check_ranks_agree()
            # The strategy has broadcast rank 0's weights and buffers; from here each step averages what changed.
            self._buffer_sync = BufferSync([self.G, self.D, self.objective])
            self._buffer_sync.mark()
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

    @property
    def batch_gpu(self) -> int:
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

    def labels_to_c(self, labels: Tensor) -> Tensor | None:
        return F.one_hot(labels.long(), self.c_dim).float() if self.c_dim > 0 else None

    def draw_latents(self, phase: Phase, n: int, real_c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Latents (and shuffled real labels) for `phase`'s fakes on this rank's `n` images."""
        gen_z = torch.randn([n, self.z_dim], device=self.device)
        gen_c = real_c[torch.randperm(n, device=self.device)] if real_c is not None else None
        return gen_z, gen_c

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self._rng_ready:
            self._setup_rng()

        if self.data_monitor is not None and "stream" in batch:
            self.data_monitor.update(batch["stream"])
        real_img = batch["image"].to(torch.float32) / 127.5 - 1  # uint8 travels to the GPU; convert there
        real_c = self.labels_to_c(batch["label"])
        n = real_img.shape[0]
        opt_g, opt_d = self._optimizers()
        stats: dict[str, Tensor] = {}

        chunk = self.batch_gpu
        for phase in self.phases:
            if self.step_idx % phase.interval != 0:
                continue
            gen_z, gen_c = self.draw_latents(phase, n, real_c)
            opt = opt_g if phase.net == "G" else opt_d
            self.toggle_optimizer(opt)
            opt.zero_grad(set_to_none=True)
            # Gradient accumulation over rounds of `batch_gpu` images: each round's mean loss is weighted by its
            # share of the rank's batch, so the summed gradient is that of the whole batch's mean loss.
            for start in range(0, n, chunk):
                sl = slice(start, start + chunk)
                inputs = PhaseInputs(
                    real_img[sl],
                    real_c[sl] if real_c is not None else None,
                    gen_z[sl],
                    gen_c[sl] if gen_c is not None else None,
                    self.augment,
                )
                loss, phase_stats = self.objective.phase_loss(phase, self.G, self.D, inputs)
                self.manual_backward(loss * (chunk / n) if chunk < n else loss)
                for name, value in phase_stats.items():
                    weighted = value.detach() * (chunk / n)
                    stats[name] = stats[name] + weighted if name in stats and start > 0 else weighted
            params = list((self.G if phase.net == "G" else self.D).parameters())
            # Once per phase, after its last backward (R1's double backward included): average over ranks.
            all_reduce_gradients(params)
            for p in params:
                if p.grad is not None:
                    # One bad batch must not poison Adam's moments (StyleGAN2-ADA does the same).
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            self.untoggle_optimizer(opt)

        if self._buffer_sync is not None:
            self._buffer_sync.sync()  # before the EMA, which copies G's buffers into G_ema

        global_batch = n * self.world_size
        t = self.cfg.train
        ema_kimg = t.ema_kimg if t.ema_kimg is not None else self.cfg.data.batch_size * 10 / 32
        update_ema(self.G_ema, self.G, ema_beta(global_batch, ema_kimg, t.ema_rampup, self.cur_nimg))
        self.cur_nimg += global_batch
        if self.augment is not None:
            reduce = None
            if self.world_size > 1:  # every rank calls this each step, so the all-reduces match
                reduce = lambda x: self.trainer.strategy.reduce(x.to(self.device), reduce_op="sum")  # noqa: E731
            self.augment.end_step(self.step_idx, global_batch, reduce)
            stats.update(self.augment.log_values())
        self.step_idx += 1
        self._log_step(stats)

    def _log_step(self, stats: dict[str, Tensor]) -> None:
        kimg = self.cur_nimg / 1000
        if self.world_size > 1 and stats:
            # Means over ranks, in one collective (every rank runs the same phases, so the names agree).
            names = sorted(stats)
            values = torch.stack([stats[k].float().reshape(()) for k in names]).to(self.device)
            values = self.trainer.strategy.reduce(values, reduce_op="mean")
            stats = dict(zip(names, values.unbind(), strict=True))
        self.log("kimg", kimg, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        for name, value in stats.items():
            short = {"Loss/G/loss": "loss_G", "Loss/D/loss": "loss_D"}.get(name)
            self.log(name, value, on_step=True, on_epoch=False, sync_dist=False)
            if short:
                self.log(short, value, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        if self.trainer is not None and self.step_idx % max(self.trainer.log_every_n_steps, 1) == 0:
            now = time.perf_counter()
            dt, dn = now - self._tick_time, self.cur_nimg - self._tick_nimg
            if dt > 0 and dn > 0:
                self.log("Timing/img_per_sec", dn / dt, on_step=True, on_epoch=False)
                self.log("Timing/sec_per_kimg", dt / (dn / 1000), on_step=True, on_epoch=False)
            self.log("Resources/peak_mem_gb", peak_memory_gb(self.device), on_step=True, on_epoch=False)
            self._tick_time, self._tick_nimg = now, self.cur_nimg
            self._log_data()

    def _log_data(self) -> None:
        """Data counters summed over ranks (every rank takes part), logged; then the "too many bad samples" stop,
        which every rank decides alike from the same sums, so no rank is left waiting in a collective."""
        if self.data_monitor is None:
            return
        totals = self.data_monitor.counters()
        if self.world_size > 1:
            totals = self.trainer.strategy.reduce(totals.to(self.device), reduce_op="sum").cpu()
        for name, value in StreamMonitor.log_values(totals).items():
            self.log(name, value, on_step=True, on_epoch=False, rank_zero_only=True)
        self.data_monitor.check(totals)  # raises DatasetError; checkpoints and logs written so far stay

    # ------------------------------------------------------------------------------------------------------------
    # Exact resume

    def training_state(self) -> dict[str, Any]:
        """Everything a checkpoint holds (tensors and builtins only)."""
        return {
            "family": self.cfg.family,
            "config": self.cfg.to_dict(),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "objective": self.objective.state_dict(),
            "augment": self.augment.state_dict() if self.augment is not None else None,
            "optimizers": [opt.state_dict() for opt in self.trainer.optimizers],
            "counters": {"cur_nimg": self.cur_nimg, "step_idx": self.step_idx},
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
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, state)
            state = {**ranks[0], "ranks": ranks}
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.objective.load_state_dict(state["objective"])
        if self.augment is not None and state.get("augment") is not None:
            self.augment.load_state_dict(state["augment"])
        self.cur_nimg = int(state["counters"]["cur_nimg"])
        self.step_idx = int(state["counters"]["step_idx"])
        self._pending_optimizer_states = state["optimizers"]
        self._pending_rng = state["rng"]
        self.resume_data_state = state.get("data")


def freeze_discriminator(D: torch.nn.Module, num_layers: int) -> None:
    """Stop training D's first `num_layers` layers (`freeze_d`, NVIDIA's --freezed): they keep their weights
    (e.g. from `init=`), pass gradients through to G and to R1's inputs, and are left out of D's optimizer."""
    order = getattr(D, "freeze_order", None)
    if order is None:
        raise ConfigError(f"freeze_d={num_layers} is invalid: this family's discriminator has no layer order")
    layers = order()
    if num_layers > len(layers):
        raise ConfigError(f"freeze_d={num_layers} is invalid: this discriminator has {len(layers)} block layers")
    for layer in layers[:num_layers]:
        layer.requires_grad_(False)


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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
