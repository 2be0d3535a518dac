"""Features of real and generated images, split across ranks and gathered so every rank holds the same result.

Job: `real_features(...)` streams a dataset once (`pipeline.data.read_once`: rank r reads its share of the
shards, every sample exactly once) and `generated_features(...)` draws images through a family's sampler; both
return `Features` identical (to float rounding) to a single-process run.

Why results do not depend on the number of ranks
    Generated image i always comes from a private torch generator seeded by (seed, i): its z (the sampler's
    `latents_from`) and then its conditioning (the conditioning's `for_eval`: a uniform class, a prompt) are
    drawn from it, so which rank draws it does not matter; ranks take contiguous index blocks and the gather
    concatenates them in index order. Real images are put in sample-key order after the gather, and "the first
    N reals" are the first N keys of the leading shards that hold N samples. When every real image is used and
    only the Gaussian is needed (FID *_full), ranks add float64 sums instead of gathering features, so memory
    stays O(D^2) for any dataset size.

    Intra-class metrics draw image i of class k from the same generator (seed, i), with the class given instead
    of drawn (`class_idx`): the classes share their latents, so only the class differs between them. Per-class
    reals (`real_class_stats`) are every image of that class, or its first N sample keys after the gather.

    Features are bit-identical to a single process when each rank's batches hold the same images as the
    single process's (same batch boundaries, same thread count); otherwise float32 rounding of the generator,
    amplified by the uint8 quantisation of its images, moves single features by ~1e-4 and metrics by far less.

Collectives use `torch.distributed`'s default group when it is initialised (Lightning's DDP, torchrun, or the
tests' gloo group); tensors travel on the GPU under NCCL and on the CPU otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from pipeline.data import open_source, read_once
from pipeline.imaging import to_uint8
from pipeline.metrics.extractors import FeatureExtractor
from pipeline.metrics.math import GaussianStats
from pipeline.models.conditioning import Request
from pipeline.models.sampling import Sampler

log = logging.getLogger(__name__)

StopCheck = Callable[[], bool]  # polled between batches: True abandons the work (`Abandoned`)


class Abandoned(Exception):
    """A feature pass gave up because `should_stop()` said so on some rank (a stop signal arrived): raised on every
    rank together, and nothing is recorded."""


def stop_requested(should_stop: StopCheck | None) -> bool:
    """Whether this rank was asked to stop (polled between batches of a pass; `agree_on_stop` ends the pass)."""
    return should_stop is not None and should_stop()


def agree_on_stop(should_stop: StopCheck | None, stopped: bool) -> None:
    """Every rank ends a pass here, before its first collective: `Abandoned` on all ranks if any of them stopped.

    A rank leaves its loop early when its own `should_stop()` turns true; one that saw no signal finishes its
    share. Deciding together (one all-reduce MAX) keeps the ranks' collectives matched: a rank that raised alone
    would wait at the next step's all-reduce while the others wait in the gather, until the timeout."""
    if should_stop is None:  # the same on every rank: nothing to agree on
        return
    _, size = world()
    if size > 1:
        flag = torch.tensor([int(stopped)], device=_comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stopped = bool(flag.item())
    if stopped:
        raise Abandoned


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's [n_r, ...] tensor in rank order (n_r may differ); a no-op on one process."""
    _rank, size = world()
    if size == 1:
        return x
    dev = _comm_device()
    n = torch.tensor([x.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=dev)
    padded[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)]).to(x.device)


def gather_objects(obj: object) -> list[object]:
    _, size = world()
    if size == 1:
        return [obj]
    out: list[object] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_stats(stats: GaussianStats) -> GaussianStats:
    _, size = world()
    if size == 1:
        return stats
    # float64 on the CPU under gloo; NCCL supports float64 too.
    dev = _comm_device()
    packed = torch.from_numpy(np.concatenate([[stats.num], stats.sum, stats.outer.ravel()])).to(dev)
    dist.all_reduce(packed)
    flat = packed.cpu().numpy()
    d = stats.sum.shape[0]
    return GaussianStats(round(flat[0]), flat[1 : 1 + d].copy(), flat[1 + d :].reshape(d, d).copy())


@dataclass
class Features:
    """What a metric needs of one image set: its Gaussian, and the features/logits/classes where kept."""

    stats: GaussianStats  # of 0-d features when no extractor ran (only `num` is meaningful then)
    features: Tensor | None = None  # [N, D] float32 (CPU), in index / key order
    logits: Tensor | None = None  # [N, classes] float32 (CPU), generated images only
    labels: Tensor | None = None  # [N] int64 (CPU): the class each image was drawn for (class-conditional G only)
    predictions: Tensor | None = None  # [N] int64 (CPU): the class a classifier sees in each generated image
    confidences: Tensor | None = None  # [N] float32 (CPU): the classifier's probability of that class

    @property
    def num(self) -> int:
        return self.stats.num


def real_features(
    url: str,
    extractor: FeatureExtractor,
    *,
    resolution: int | None,
    batch_size: int,
    num_workers: int = 0,
    num_real: int | None = None,
    keep_features: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> Features:
    """Features of the first `num_real` reals (None = all), every rank reading its share of the shards; `Abandoned`
    (on every rank) once `should_stop()`, polled between batches, is true on any rank.

    "The first N" are the first N sample keys of the fewest leading shards (manifest order) that hold N samples,
    so a non-full metric reads about N images, not the whole dataset; without shard counts (a bare shard
    pattern) every shard is read and the first N keys are kept."""
    rank, size = world()
    source = open_source(url)
    if num_real is not None and source.shard_sizes:
        # Read only the leading shards that hold num_real samples: a choice that does not depend on the ranks.
        cum = np.cumsum(source.shard_sizes)
        m = int(np.searchsorted(cum, num_real) + 1) if cum[-1] >= num_real else len(cum)
        source = dataclasses.replace(source, shard_urls=source.shard_urls[:m], shard_sizes=source.shard_sizes[:m])
    reader = read_once(source, batch_size=batch_size, resolution=resolution, num_workers=num_workers, rank=rank,
                       world_size=size)  # fmt: skip
    streaming = num_real is None and not keep_features  # FID *_full: sums only, any dataset size
    stats = GaussianStats.empty(extractor.dim)
    keys: list[str] = []
    chunks: list[Tensor] = []
    bar = tqdm(desc="reals", unit="img", disable=not progress or rank != 0, leave=False)
    stopped = False
    with contextlib.closing(iter(reader)) as batches:  # closed at once when stopped: its workers end now
        for batch in batches:
            if stopped := stop_requested(should_stop):
                break
            feats = extractor(batch["image"].to(device))["features"].cpu()
            if streaming:
                stats.add(feats)
            else:
                keys.extend(batch["key"])
                chunks.append(feats)
            bar.update(feats.shape[0])
    bar.close()
    agree_on_stop(should_stop, stopped)
    if reader.stats.num_bad:
        log.warning("skipped %d unusable real images while computing features: %s", reader.stats.num_bad,
                    {k: v for k, v in reader.stats.bad.items() if v})  # fmt: skip
    if streaming:
        return Features(all_reduce_stats(stats))
    local = torch.cat(chunks) if chunks else torch.zeros((0, extractor.dim))
    everything = gather_rows(local)
    all_keys = [k for part in gather_objects(keys) for k in part]  # type: ignore[union-attr]
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    if num_real is not None:
        order = order[:num_real]
    feats = everything[torch.tensor(order, dtype=torch.long)] if order else everything[:0]
    return Features(GaussianStats.of(feats), feats if keep_features else None)


def eval_generators(indices: range, seed: int) -> list[torch.Generator]:
    """The private generator of each generated image: a function of (seed, index) only."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]


def class_labels(c: Tensor, num_classes: int) -> Tensor:
    """The class indices [N] (int64) behind a class conditioning's `c`: one-hot rows [N, num_classes] or indices
    [N], the two encodings of `pipeline.models.conditioning.ClassConditioning`."""
    if c.ndim == 1:
        return c.long()
    if c.ndim == 2 and c.shape[1] == num_classes:
        return c.argmax(dim=1)
    raise TypeError(f"class conditioning of shape {tuple(c.shape)} is neither one-hot [N, {num_classes}] nor indices")


@torch.no_grad()
def generated_features(
    sampler: Sampler,
    extractor: FeatureExtractor | None,
    num: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    keep_features: bool = True,
    keep_logits: bool = False,
    classifier: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
    class_idx: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> Features:
    """Features of generated images 0..num-1 (rank r draws a contiguous block), gathered in index order; `Abandoned`
    (on every rank) once `should_stop()`, polled between batches, is true on any rank.

    `extractor=None` extracts nothing (0-d features: for metrics that only classify). `classifier` (uint8 images
    -> (top class int64 [N], its probability [N]), e.g. `TrainedClassifier.classify`) runs once per batch and
    fills `predictions` and `confidences`, and, for a class-conditional generator (conditioning kind "class"),
    `labels` with the class each image was drawn for (None for any other generator). `class_idx` draws every
    image for that class (the sampler's `from_request`) instead of the per-image class of `for_eval`; image i
    keeps its latent."""
    rank, size = world()
    lo, hi = rank * num // size, (rank + 1) * num // size
    device = torch.device(device)
    dim = extractor.dim if extractor is not None else 0
    feats, logits, labels, preds, probs = [], [], [], [], []
    class_conditional = sampler.conditioning.kind == "class"
    bar = tqdm(total=num, desc="fakes", unit="img", disable=not progress or rank != 0, leave=False)
    stopped = False
    for start in range(lo, hi, batch_size):
        if stopped := stop_requested(should_stop):
            break
        generators = eval_generators(range(start, min(start + batch_size, hi)), seed)
        z = sampler.latents_from(generators)  # each generator gives its image's z first, then its conditioning
        if class_idx is None:
            c = sampler.conditioning.for_eval(generators, device)
        else:
            c = sampler.conditioning.from_request(z.shape[0], Request(class_idx=class_idx), device)
        images = to_uint8(sampler.synthesize(z.to(device), c))
        if extractor is not None:
            out = extractor(images)
            feats.append(out["features"].cpu())
            if keep_logits:
                logits.append(out["logits"].cpu())
        if classifier is not None:
            if class_conditional:
                labels.append(class_labels(c, sampler.conditioning.num_classes).cpu())
            top_class, top_prob = classifier(images)
            preds.append(top_class.cpu())
            probs.append(top_prob.float().cpu())
        bar.update(z.shape[0] * size)
    bar.close()
    agree_on_stop(should_stop, stopped)
    if extractor is not None:
        f = gather_rows(torch.cat(feats) if feats else torch.zeros((0, dim)))
    else:  # nothing to gather: 0-d features of the right count
        f = torch.zeros((num, 0))
    lg = lb = pr = cf = None
    if keep_logits:
        classes = 1008 if not logits else logits[0].shape[1]
        lg = gather_rows(torch.cat(logits) if logits else torch.zeros((0, classes)))
    if classifier is not None:
        if class_conditional:
            lb = gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
        pr = gather_rows(torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long))
        cf = gather_rows(torch.cat(probs) if probs else torch.zeros(0))
    assert f.shape[0] == num, f"gathered {f.shape[0]} generated features, expected {num}"
    return Features(GaussianStats.of(f), f if keep_features and extractor is not None else None, lg, lb, pr, cf)


def real_class_stats(
    url: str,
    extractor: FeatureExtractor,
    classes: Sequence[int],
    *,
    resolution: int | None,
    batch_size: int,
    num_workers: int = 0,
    num_real: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    should_stop: StopCheck | None = None,
) -> dict[int, GaussianStats]:
    """Per class in `classes`: the Gaussian of that class's reals, all of them (`num_real=None`) or its first
    `num_real` sample keys; every rank reads its share of the shards in one pass, and only images of these
    classes go through the extractor. A class without reals maps to empty statistics (num 0). Memory: one
    D x D float64 sum per class (callers split many classes into groups), plus up to 2 x num_real features per
    class while it reads. `Abandoned` (on every rank) as in `real_features`.

    Labels are not in the manifest per shard, so unlike `real_features` the whole dataset is read even for
    `num_real`: a class's first keys may sit in any shard."""
    rank, size = world()
    wanted = sorted(set(classes))
    reader = read_once(open_source(url), batch_size=batch_size, resolution=resolution, num_workers=num_workers,
                       rank=rank, world_size=size)  # fmt: skip
    stats = {k: GaussianStats.empty(extractor.dim) for k in wanted}
    kept: dict[int, tuple[list[str], list[Tensor]]] = {k: ([], []) for k in wanted}
    want = torch.tensor(wanted, dtype=torch.long)
    bar = tqdm(desc="reals by class", unit="img", disable=not progress or rank != 0, leave=False)
    stopped = False
    with contextlib.closing(iter(reader)) as batches:
        for batch in batches:
            if stopped := stop_requested(should_stop):
                break
            labels = torch.as_tensor(batch["label"], dtype=torch.long)
            bar.update(labels.shape[0])
            mine = torch.isin(labels, want)
            if not bool(mine.any()):
                continue
            rows = mine.nonzero()[:, 0]
            feats = extractor(batch["image"][rows].to(device))["features"].cpu()
            labels = labels[rows]
            for k in labels.unique().tolist():
                sel = labels == k
                if num_real is None:
                    stats[k].add(feats[sel])
                    continue
                keys, chunks = kept[k]
                keys.extend(batch["key"][i] for i in rows[sel].tolist())
                chunks.append(feats[sel])
                if len(keys) > 2 * num_real:  # keep this rank's first num_real keys: the global first are among them
                    kept[k] = _first_keys(keys, torch.cat(chunks), num_real)
    bar.close()
    agree_on_stop(should_stop, stopped)
    if reader.stats.num_bad:
        log.warning("skipped %d unusable real images while computing per-class features: %s", reader.stats.num_bad,
                    {k: v for k, v in reader.stats.bad.items() if v})  # fmt: skip
    if num_real is None:
        return {k: all_reduce_stats(stats[k]) for k in wanted}
    # Gather every rank's candidates in one collective per kind, then keep each class's first num_real keys.
    local_keys: list[str] = []
    local_feats: list[Tensor] = []
    local_cls: list[int] = []
    for k in wanted:
        keys, chunks = kept[k]
        local_keys.extend(keys)
        local_feats.extend(chunks)
        local_cls.extend([k] * len(keys))
    everything = gather_rows(torch.cat(local_feats) if local_feats else torch.zeros((0, extractor.dim)))
    cls = gather_rows(torch.tensor(local_cls, dtype=torch.long))
    all_keys = [k for part in gather_objects(local_keys) for k in part]  # type: ignore[union-attr]
    out = {}
    for k in wanted:
        rows = (cls == k).nonzero()[:, 0].tolist()
        keys, feats = _first_keys([all_keys[i] for i in rows], everything[rows], num_real)
        out[k] = GaussianStats.of(torch.cat(feats) if feats else torch.zeros((0, extractor.dim)))
    return out


def _first_keys(keys: list[str], feats: Tensor, n: int) -> tuple[list[str], list[Tensor]]:
    """The n smallest keys and their feature rows (as one chunk)."""
    order = sorted(range(len(keys)), key=keys.__getitem__)[:n]
    return [keys[i] for i in order], [feats[torch.tensor(order, dtype=torch.long)]] if order else []


__all__ = [
    "Abandoned",
    "Features",
    "StopCheck",
    "agree_on_stop",
    "all_reduce_stats",
    "class_labels",
    "eval_generators",
    "gather_objects",
    "gather_rows",
    "generated_features",
    "real_class_stats",
    "real_features",
    "stop_requested",
    "world",
]
