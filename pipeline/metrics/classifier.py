"""The class classifier behind the `acc` and `conf` metrics: a small CNN trained on a labelled dataset's reals, cached.

Job: `dataset_classifier(url, ...)` returns a `TrainedClassifier` for the dataset at `url` (its `.cls` labels) at
one resolution: from the cache when an entry fits, else trained here (deterministically, seeded) and written to
the cache. `acc` asks it which class each generated image shows and compares with the class the image was
generated for; its accuracy on held-out reals is the ceiling a perfect generator would reach. `conf` asks how
sure it is: the share of images whose top class probability is at least `CONFIDENT` and how evenly those spread
over the classes (`Confidence`), for generated images and, measured once at training time, for the held-out
reals (`TrainedClassifier.heldout_confidence`: what a generator whose samples look like the data would reach).

The classifier (`SmallClassifier`)
    Images are resized to 32x32 (antialiased) and rounded to 8 bits, then three conv-BN-ReLU-maxpool blocks
    (16, 32, 64 channels), a global max pool and a linear layer. The max pool makes it find a shape wherever it
    sits; batch norm is what lets it train in a few hundred steps. It is deliberately small: on the built-in
    synthetic set (6 shape classes, 2000 images at 32 or 64 px) it reaches 100% held-out accuracy in 200 steps
    of 64 images: 4-5 s of training after 0.5 s of reading on 2 busy CPU cores (99.9% on the 10000-image set).
    On data with many classes (ImageNet) it is far weaker than a pretrained network; the ceiling in the results
    says how far.

Training data (`ClassifierRecipe`)
    The first `max_reals` sample keys of the leading shards (all of a small dataset), read once by rank 0.
    A sample is held out when sha256(key) mod `holdout_every` == 0 (~10%), so the split depends only on the
    keys, never on shards, workers or ranks. Initialisation and batches come from `seed` (inside
    `torch.random.fork_rng`: evaluation never moves the training RNG). Adam, cosine-decayed learning rate.

Cache
    `<cache_url>/classifiers/classifier-<res>px-<digest>.safetensors` (tensors + string metadata: held-out
    accuracy, counts, number of classes, and the held-out reals' confidence: `confident_threshold`,
    `heldout_confident_share`, `heldout_confident_spread`, `heldout_confident_counts` (JSON list per class); never
    a pickle), written atomically. The digest covers the dataset's fingerprint (its manifest, as for reference
    statistics), the resolution, the recipe, `CONFIDENT` and `CLASSIFIER_VERSION`, so changed data, a changed
    recipe or threshold never hits an old entry; an unreadable entry is a miss.

Several ranks
    Rank 0 loads or trains; every other rank receives the same weights by broadcast (no shared cache folder
    needed), so every rank classifies identically. All ranks must call `dataset_classifier` together. Rank 0
    polls `should_stop` while it reads and trains and tells the others (`Abandoned` everywhere); a stop seen
    only by another rank waits until rank 0 is done (seconds on small data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.data import open_source, read_once
from pipeline.errors import ConfigError, GanpipeError
from pipeline.metrics.extractors import _to_rgb
from pipeline.metrics.features import Abandoned, StopCheck, _comm_device, world
from pipeline.metrics.refs import dataset_fingerprint
from pipeline.storage import publish_atomic

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 2  # 2: entries hold the held-out reals' confidence (the `conf` metric)
CLASSIFIER_SIZE = 32  # images are classified at 32x32: enough for shapes, cheap enough to train on a CPU
# This network's convolutions are so small that OpenMP synchronisation dominates them: on 2 busy cores, 200 steps
# took 7 s on one thread and 2 minutes on two. One thread is never much slower and never that much slower.
CPU_TRAIN_THREADS = 1
# `conf`: an image is "confidently classified" when its top class gets at least this probability. Measured on the
# built-in 10000-image set at 32 px with the default recipe: held-out reals clear 0.9 in 85% of cases (0.8: 95%,
# 0.95: 68%); images that are not one clear shape rarely do: two shapes blended 50/50 13% (0.8: 26%), smooth random
# colour blobs 0% (0.8: 0.1%), shapes blurred by a Gaussian of sigma 1 / 1.5 px 11% / 2% (0.8: 24% / 4%). 0.9 keeps
# the widest gap between crisp shapes and ambiguous ones while most reals still pass, so the reals' share is a
# ceiling a generator can reach. The classifier never saw soft edges, so softness counts against a sample as much
# as ambiguity does; read confN against confN_reals. Uniform pixel noise is confidently one class ("ring"): the
# spread (0 then) is what exposes such a collapse.
CONFIDENT = 0.9


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained; every field is part of the cache key."""

    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 64)
    max_reals: int = 50_000  # at most this many reals are read (held-out ones included): 150 MB at 32x32
    holdout_every: int = 10

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "widths": list(self.widths)}


DEFAULT_RECIPE = ClassifierRecipe()


class SmallClassifier(nn.Module):
    """uint8 images [N, C, H, W] (any size, 1/3/4 channels) -> class logits [N, num_classes]."""

    def __init__(self, num_classes: int, widths: Sequence[int] = DEFAULT_RECIPE.widths) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for w in widths:
            # bias=False: batch norm's shift makes a conv bias redundant
            layers += [nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            channels = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        self.num_classes = num_classes

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 [N, C, H, W] -> uint8 [N, 3, 32, 32]: what the network sees, stored this small for training."""
        x = _to_rgb(images).float()
        if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
            x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)  # fmt: skip
        return x.round().clamp(0, 255).to(torch.uint8)

    def forward(self, images: Tensor) -> Tensor:
        x = self.prepare(images).float() / 127.5 - 1
        return self.head(self.body(x).amax(dim=(2, 3)))


def normalized_entropy(counts: Sequence[int]) -> float:
    """How evenly `counts` (one per class, >= 0) spread over the classes: H(p) / ln K with p = counts / sum and K =
    len(counts). 1 = the same count in every class, 0 = everything in one class. NaN when the counts sum to 0 (no
    histogram to spread; 0 would read as "one class", which is another failure) or K < 2 (nothing to spread over)."""
    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return float("nan")
    p = np.asarray([c / total for c in counts if c > 0], dtype=np.float64)
    return float((p * np.log(1 / p)).sum() / math.log(len(counts)))  # log(1/p): one class gives 0.0, never -0.0


@dataclass(frozen=True)
class Confidence:
    """Which of `num` images a classifier names confidently (top class probability >= `CONFIDENT`), per class."""

    num: int  # images looked at
    counts: tuple[int, ...]  # per class: the confidently classified images whose top class it is

    @property
    def share(self) -> float:
        """The fraction of the images classified confidently (NaN of no images)."""
        return sum(self.counts) / self.num if self.num else float("nan")

    @property
    def spread(self) -> float:
        """`normalized_entropy` of `counts`: 1 = the confident images are even over the classes, 0 = one class;
        NaN when none is confident."""
        return normalized_entropy(self.counts)


def confidence(top_class: Tensor, top_prob: Tensor, num_classes: int, threshold: float = CONFIDENT) -> Confidence:
    """`Confidence` of images whose top class is `top_class` (int64 [N]) with probability `top_prob` ([N])."""
    sure = top_prob >= threshold
    counts = torch.bincount(top_class[sure].long().cpu(), minlength=num_classes)
    return Confidence(int(top_class.shape[0]), tuple(int(c) for c in counts.tolist()))


@dataclass
class TrainedClassifier:
    """A dataset's classifier and what is known about it."""

    net: SmallClassifier
    heldout_accuracy: float  # on the held-out reals (NaN when the dataset is too small to hold any out)
    num_train: int
    num_heldout: int
    classifier_id: str  # names the cache entry: classifier-<res>px-<digest>
    heldout_confidence: Confidence  # of the held-out reals (num 0, share NaN, when none is held out)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @torch.no_grad()
    def classify(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(top class int64 [N], its softmax probability float32 [N]) of uint8 images [N, C, H, W], on the images'
        device: what `acc` (the class) and `conf` (the probability) need, from one forward pass."""
        dev = next(self.net.parameters()).device
        probs = torch.softmax(self.net(images.to(dev)).float(), dim=1)
        top_prob, top_class = probs.max(dim=1)
        return top_class.to(images.device), top_prob.to(images.device)


# ------------------------------------------------------------------------------------------------------------
# Training


def held_out(key: str, every: int) -> bool:
    """Whether the sample with this key is held out: a function of the key alone."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % every == 0


def labelled_reals(
    url: str,
    *,
    resolution: int | None,
    max_reals: int,
    batch_size: int,
    num_workers: int = 0,
    who: str = "acc",
    should_stop: StopCheck | None = None,
) -> tuple[Tensor, Tensor, list[str], int]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N], keys, num_classes) of the first `max_reals` keys of the
    leading shards, in key order, read by this process alone. `who` names the metric in errors. `Abandoned`
    once `should_stop()` is true."""
    source = open_source(url)
    m = source.manifest
    if m is not None and not m.has_labels:
        raise ConfigError(
            f"{who} needs class labels (.cls) but the dataset at {url!r} has none: write it with "
            "`ganpipe data shards --layout classes`"
        )
    if source.shard_sizes:
        cum = np.cumsum(source.shard_sizes)
        n = int(np.searchsorted(cum, max_reals) + 1) if cum[-1] >= max_reals else len(cum)
        source = dataclasses.replace(source, shard_urls=source.shard_urls[:n], shard_sizes=source.shard_sizes[:n])
    images, labels, keys = [], [], []
    reader = read_once(source, batch_size=batch_size, resolution=resolution, num_workers=num_workers)
    with contextlib.closing(iter(reader)) as batches:  # closed at once when stopped: its workers end now
        for batch in batches:
            if should_stop is not None and should_stop():
                raise Abandoned
            images.append(SmallClassifier.prepare(batch["image"]))
            labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
            keys.extend(batch["key"])
    if not keys:
        raise ConfigError(f"{who}: the dataset at {url!r} gave no usable images to train its classifier on")
    x, y = torch.cat(images), torch.cat(labels)
    if bool((y < 0).all()):  # no manifest, and no .cls in the shards
        raise ConfigError(
            f"{who} needs class labels (.cls) but the shards at {url!r} have none: write them with "
            "`ganpipe data shards --layout classes`"
        )
    order = sorted(range(len(keys)), key=keys.__getitem__)[:max_reals]
    index = torch.tensor(order, dtype=torch.long)
    x, y, keys = x[index], y[index], [keys[i] for i in order]
    keep = y >= 0  # a manifest-less dataset with some unlabelled samples: train on the labelled ones
    x, y = x[keep], y[keep]
    keys = [k for k, ok in zip(keys, keep.tolist(), strict=True) if ok]
    num_classes = m.num_classes if m is not None else int(y.max()) + 1
    return x, y, keys, num_classes


@contextlib.contextmanager
def _cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """At most `n` intra-op threads while training on the CPU, restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and before > n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(
    images: Tensor,
    labels: Tensor,
    keys: Sequence[str],
    num_classes: int,
    recipe: ClassifierRecipe = DEFAULT_RECIPE,
    device: torch.device | str = "cpu",
    should_stop: StopCheck | None = None,
) -> tuple[SmallClassifier, float, int, int, Confidence]:
    """(classifier in eval mode on the CPU, held-out accuracy, num_train, num_heldout, the held-out reals'
    `Confidence`), seeded by the recipe. Accuracy is NaN (and the confidence counts zero) without held-out reals."""
    device = torch.device(device)
    hold = torch.tensor([held_out(k, recipe.holdout_every) for k in keys], dtype=torch.bool)
    if bool(hold.all()):  # a one- or two-image dataset: train on everything rather than on nothing
        hold[:] = False
    x_train, y_train = images[~hold].to(device), labels[~hold].to(device)
    x_test, y_test = images[hold].to(device), labels[hold].to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded initialisation without moving the caller's RNG
        torch.manual_seed(recipe.seed)
        net = SmallClassifier(num_classes, recipe.widths).to(device)
    batches = torch.Generator().manual_seed(recipe.seed)  # private: the batch draws
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    net.train()
    with torch.enable_grad(), _cpu_threads(device, CPU_TRAIN_THREADS):  # evaluation runs under no_grad
        for step in range(recipe.steps):
            if should_stop is not None and should_stop():
                raise Abandoned
            for group in opt.param_groups:
                group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
            idx = torch.randint(len(x_train), (min(recipe.batch_size, len(x_train)),), generator=batches).to(device)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    accuracy = float("nan")
    top_prob, top_class = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if len(x_test):
        with torch.no_grad():
            probs = torch.cat([torch.softmax(net(b).float(), dim=1) for b in x_test.split(512)])
        top_prob, top_class = probs.max(dim=1)
        accuracy = float((top_class == y_test).double().mean())
    heldout = confidence(top_class, top_prob, num_classes)
    return net.cpu(), accuracy, len(x_train), len(x_test), heldout


# ------------------------------------------------------------------------------------------------------------
# The cache


def classifier_url(cache_url: str, fingerprint: str, resolution: int | None, recipe: ClassifierRecipe) -> str:
    text = json.dumps([CLASSIFIER_VERSION, fingerprint, resolution, recipe.to_dict(), CONFIDENT])
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    return f"{cache_url.rstrip('/')}/classifiers/classifier-{resolution}px-{digest}.safetensors"


def _serialise(c: TrainedClassifier, recipe: ClassifierRecipe) -> bytes:
    from safetensors.torch import save

    meta = {
        "version": str(CLASSIFIER_VERSION),
        "num_classes": str(c.num_classes),
        "heldout_accuracy": repr(c.heldout_accuracy),
        "num_train": str(c.num_train),
        "num_heldout": str(c.num_heldout),
        "classifier_id": c.classifier_id,
        "recipe": json.dumps(recipe.to_dict()),
        "confident_threshold": repr(CONFIDENT),
        "heldout_confident_share": repr(c.heldout_confidence.share),
        "heldout_confident_spread": repr(c.heldout_confidence.spread),
        "heldout_confident_counts": json.dumps(list(c.heldout_confidence.counts)),
    }
    return save({k: v.contiguous() for k, v in c.net.state_dict().items()}, metadata=meta)


def _deserialise(data: bytes) -> TrainedClassifier:
    """Raises ValueError / KeyError on anything but an entry `_serialise` wrote."""
    from safetensors.torch import load

    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if int(meta["version"]) != CLASSIFIER_VERSION:
        raise ValueError(f"version {meta['version']}")
    if float(meta["confident_threshold"]) != CONFIDENT:
        raise ValueError(f"confident_threshold {meta['confident_threshold']}")
    recipe = json.loads(meta["recipe"])
    net = SmallClassifier(int(meta["num_classes"]), recipe["widths"])
    net.load_state_dict(load(data))
    net.eval().requires_grad_(False)
    counts = tuple(int(c) for c in json.loads(meta["heldout_confident_counts"]))
    if len(counts) != net.num_classes:
        raise ValueError(f"{len(counts)} held-out confident counts for {net.num_classes} classes")
    heldout = Confidence(int(meta["num_heldout"]), counts)
    return TrainedClassifier(net, float(meta["heldout_accuracy"]), int(meta["num_train"]), int(meta["num_heldout"]),
                             meta["classifier_id"], heldout)  # fmt: skip


def _read(url: str) -> TrainedClassifier | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    try:
        return _deserialise(fs.cat_file(path))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # corrupt or foreign: a miss, not a failure
        log.warning("ignoring unreadable classifier %s (%s: %s)", url, type(e).__name__, e)
        return None


def _load_or_train(
    url: str,
    *,
    cache_url: str | None,
    resolution: int | None,
    recipe: ClassifierRecipe,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
    who: str,
    should_stop: StopCheck | None,
) -> tuple[TrainedClassifier, bool]:
    fingerprint = dataset_fingerprint(url)
    entry = classifier_url(cache_url or "memory://unused", fingerprint, resolution, recipe)
    if cache_url:
        found = _read(entry)
        if found is not None:
            log.info("classifier: cache hit %s", entry)
            return found, True
    t0 = time.perf_counter()
    images, labels, keys, num_classes = labelled_reals(
        url, resolution=resolution, max_reals=recipe.max_reals, batch_size=batch_size, num_workers=num_workers,
        who=who, should_stop=should_stop,
    )  # fmt: skip
    net, accuracy, n_train, n_test, heldout = train_classifier(images, labels, keys, num_classes, recipe, device,
                                                               should_stop)  # fmt: skip
    name = entry.rsplit("/", 1)[-1].removesuffix(".safetensors")
    trained = TrainedClassifier(net, accuracy, n_train, n_test, name, heldout)
    log.info("classifier: trained on %d reals in %.1fs, held-out accuracy %.4f, confident %.4f (spread %.4f) on %d "
             "(%s)", n_train, time.perf_counter() - t0, accuracy, heldout.share, heldout.spread, n_test,
             entry if cache_url else "no cache")  # fmt: skip
    if cache_url:
        publish_atomic(entry, _serialise(trained, recipe))  # readers never see a half-written entry
    return trained, False


def dataset_classifier(
    url: str,
    *,
    cache_url: str | None,
    resolution: int | None,
    recipe: ClassifierRecipe | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    who: str = "acc",
    should_stop: StopCheck | None = None,
) -> tuple[TrainedClassifier, bool]:
    """(the classifier of the dataset at `url`, on `device`; whether the cache had it). `recipe=None` is
    `DEFAULT_RECIPE`; `cache_url=None` trains without caching. `who` names the metric in errors (a dataset
    without labels is one `ConfigError` line). Every rank calls it together; rank 0 does the work (see the module
    docstring)."""
    recipe = recipe or DEFAULT_RECIPE  # read at call time: tests swap in a shorter recipe
    rank, size = world()
    if size == 1:
        trained, hit = _load_or_train(url, cache_url=cache_url, resolution=resolution, recipe=recipe,
                                      batch_size=batch_size, num_workers=num_workers, device=device, who=who,
                                      should_stop=should_stop)  # fmt: skip
    else:
        # Rank 0's outcome travels to every rank, failures included, so no rank waits for a broadcast that never
        # comes: ("ok", entry bytes, hit), ("stopped",) or ("error", exception).
        payload: tuple = ("stopped",)
        failure: BaseException | None = None
        if rank == 0:
            try:
                trained, hit = _load_or_train(url, cache_url=cache_url, resolution=resolution, recipe=recipe,
                                              batch_size=batch_size, num_workers=num_workers, device=device,
                                              who=who, should_stop=should_stop)  # fmt: skip
                payload = ("ok", _serialise(trained, recipe), hit)
            except Abandoned:
                payload = ("stopped",)
            except Exception as e:  # rank 0 raises it below, after telling the others
                failure = e
                # ganpipe's own errors are one message (they pickle); anything else travels as its description
                told = e if isinstance(e, GanpipeError) else RuntimeError(f"rank 0: {type(e).__name__}: {e}")
                payload = ("error", told)
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=_comm_device())
        payload = box[0]
        if failure is not None:
            raise failure
        if payload[0] == "stopped":
            raise Abandoned
        if payload[0] == "error":
            raise payload[1]
        if rank != 0:
            trained, hit = _deserialise(payload[1]), payload[2]
    trained.net.to(device)
    return trained, hit


__all__ = [
    "CLASSIFIER_SIZE",
    "CLASSIFIER_VERSION",
    "CONFIDENT",
    "DEFAULT_RECIPE",
    "ClassifierRecipe",
    "Confidence",
    "SmallClassifier",
    "TrainedClassifier",
    "classifier_url",
    "confidence",
    "dataset_classifier",
    "held_out",
    "labelled_reals",
    "normalized_entropy",
    "train_classifier",
]
