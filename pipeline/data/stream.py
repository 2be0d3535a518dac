"""The streaming loader: WebDataset shards from any fsspec URL, split over ranks and workers, exactly resumable,
tolerant of bad data. Training, evaluation, `ganpipe data inspect` and the benchmark all read through it.

Where data comes from
    `open_source(url)` takes a dataset folder (with `manifest.json`), the manifest itself, or shard URLs with
    brace expansion (`s3://b/ds/shard-{000000..000123}.tar`, several joined by `::`). Every URL is opened
    through fsspec (local paths, file://, s3://, gs://, http(s)://, ...) and read front to back: nothing is
    downloaded whole. Shard counts from the manifest are used where known (to count samples lost in a broken
    shard), never required.

How the stream is defined (the contract that makes exact resume possible)
    The job has S = world_size x K "slots", K = max(1, num_workers); rank r's loader worker w serves slot
    r*K + (w + steps_done) % K (the rotation makes the loader's round-robin over workers continue where an
    uninterrupted run would be). Each slot reads an endless (training) or finite (`once`) sequence of shard
    *visits*; visit v of slot s reads shard
        resample (training default): splitmix(seed, s, v) mod num_shards (shards drawn with replacement)
        epochs:   permutation_e(seed)[s + j*S] with e, j = divmod(v, shards per slot) (each epoch deals a fresh
                  shuffle of the shards to the slots; needs num_shards >= S)
        once:     shard s + v*S, then the slot ends (evaluation, inspection: every sample exactly once)
    and emits that shard's samples through a shuffle buffer (`shuffle_buffer` samples, seeded by
    (seed, s, v)) that starts empty at every visit. Flips and crop offsets are hashes of
    (seed, s, v, offset). A slot's position is therefore two integers (visit, offset), and resuming replays
    the visit's raw tar members through the same buffer, dropping `offset` of them *without decoding*.
    Mixing across shards comes from the shard draw; `ganpipe data shards` shuffles samples into shards, so
    one shard is already a random subset of the dataset.

    webdataset's `ResampledShards`, `shuffle` and `split_by_worker` are not used for this because their state
    (a `random.Random` per worker and a buffer that spans shards) cannot be positioned without replaying the
    whole stream; its tar reader and key grouping (`tar_file_iterator`, `group_by_keys`) are.

Bad data
    A sample that cannot be used is skipped and counted by kind (`BAD_KINDS`); broken shards (unreadable after
    `retries` attempts with exponential backoff, or truncated) are skipped and count the samples they lose.
    Kinds are logged with shard and key at a limited rate, without sleeping. Every batch carries its slot's
    `SlotReport` (position and cumulative counters) under `batch["stream"]`; `StreamMonitor` (in the training
    task) turns reports into logs, checkpoint state and the "too many bad samples" stop.

Determinism and RNG hygiene
    Nothing here touches torch's, numpy's or Python's global RNG. With the same (seed, world_size, K, shards,
    options) the batches after a resume are identical to an uninterrupted run's; with another topology the
    stream restarts from a fresh seed derived from (seed, cur_nimg), and says so in the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import fsspec
import numpy as np
import torch
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.data.codec import IMAGE_EXTENSIONS, PIL_MODES, ImageDecodeError, decode_array
from pipeline.data.shards import Manifest, dataset_root, read_manifest
from pipeline.data.workers import BufferPool, PooledImages, StreamLoader
from pipeline.errors import DatasetError, require

log = logging.getLogger(__name__)

# Every kind of bad data, in the order of `SlotReport.bad`. Shard kinds count the samples the shard lost
# (from the manifest's count; 1 when unknown).
BAD_KINDS: tuple[str, ...] = (
    "shard_unreadable",  # could not open or read the shard after retries: 404, timeout, permissions, reset
    "truncated_tar",  # the tar ends early or is malformed
    "not_an_image",  # the image member is not an image at all
    "corrupt_image",  # an image that fails to decode (e.g. a truncated JPEG)
    "missing_image",  # a sample without an image member
    "missing_label",  # a labelled dataset's sample without .cls
    "bad_label",  # .cls that is not an integer in [0, num_classes)
    "missing_caption",  # a captioned dataset's sample without .txt
    "bad_caption",  # .txt that is not UTF-8
    "wrong_size",  # an image smaller than the resolution (larger ones are cropped)
)
_KIND_INDEX = {k: i for i, k in enumerate(BAD_KINDS)}
StreamMode = Literal["resample", "epochs", "once"]
MODES: tuple[str, ...] = ("resample", "epochs", "once")
_WORST_SHARDS = 5  # per slot, carried in every report (bounded, so reports stay small however many shards)
_LOG_FIRST = 5  # bad samples of each kind logged individually before rate limiting starts


# ------------------------------------------------------------------------------------------------------------
# Options


@dataclass
class StreamOptions:
    """The stream's knobs. `DataConfig` inherits them, so each is also a `data.*` config key; `from_config`
    takes them from a config section (fields it lacks keep their defaults)."""

    shuffle_buffer: int = 1000  # samples shuffled within one shard visit; 0 or 1 = the shard's own order
    resample: bool = True  # training draws shards with replacement; False = epochs of shuffled shards
    crop: Literal["center", "random"] = "center"  # how images larger than data.resolution are cropped
    max_bad_fraction: float = 0.01  # training stops when more than this fraction of samples is bad...
    bad_check_min_samples: int = 1000  # ...once at least this many samples were read
    retries: int = 3  # attempts to open a shard before it is skipped
    retry_backoff_s: float = 1.0  # first wait between attempts; doubles each time
    io_timeout_s: float = 60.0  # connect/read timeout of http(s) and s3 requests
    block_size: int = 8 << 20  # fsspec read-ahead per open shard (bytes)
    log_interval_s: float = 60.0  # after the first few, at most one bad-data line per kind per interval

    def validate(self, prefix: str = "data") -> None:
        require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        require(self.crop in ("center", "random"), f"{prefix}.crop", self.crop, "must be 'center' or 'random'")
        require(
            0.0 <= self.max_bad_fraction <= 1.0,
            f"{prefix}.max_bad_fraction",
            self.max_bad_fraction,
            "must be in [0, 1] (1 = never stop)",
        )
        require(
            self.bad_check_min_samples >= 1,
            f"{prefix}.bad_check_min_samples",
            self.bad_check_min_samples,
            "must be >= 1",
        )
        require(self.retries >= 1, f"{prefix}.retries", self.retries, "must be >= 1")
        require(self.retry_backoff_s >= 0, f"{prefix}.retry_backoff_s", self.retry_backoff_s, "must be >= 0")
        require(self.io_timeout_s > 0, f"{prefix}.io_timeout_s", self.io_timeout_s, "must be > 0")
        require(self.block_size >= 4096, f"{prefix}.block_size", self.block_size, "must be >= 4096 bytes")
        require(self.log_interval_s >= 0, f"{prefix}.log_interval_s", self.log_interval_s, "must be >= 0")

    @classmethod
    def from_config(cls, data_cfg: Any) -> StreamOptions:
        values = {f.name: getattr(data_cfg, f.name) for f in dataclasses.fields(cls) if hasattr(data_cfg, f.name)}
        options = cls(**values)
        options.validate()
        return options


# ------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class ShardSource:
    """The shards of one dataset: their URLs, sample counts where known, and the manifest if there is one."""

    url: str
    shard_urls: tuple[str, ...]
    shard_sizes: tuple[int, ...] | None  # samples per shard (manifest), None when unknown
    manifest: Manifest | None

    @property
    def num_shards(self) -> int:
        return len(self.shard_urls)

    def shard_name(self, index: int) -> str:
        return self.shard_urls[index].rsplit("/", 1)[-1]

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list (names and counts), so a resume can tell when the data changed."""
        h = hashlib.sha256()
        for i in range(self.num_shards):
            h.update(f"{self.shard_name(i)}:{self.shard_sizes[i] if self.shard_sizes else -1};".encode())
        return h.hexdigest()[:16]


def _is_shard_pattern(url: str) -> bool:
    return "::" in url or bool(re.search(r"\{[^}]*\.\.[^}]*\}|\{[^}]*,[^}]*\}", url)) or url.endswith(".tar")


def open_source(url: str) -> ShardSource:
    """Resolve a dataset folder, its manifest, or a (brace-expanded) shard URL list; raises `DatasetError`."""
    if _is_shard_pattern(url):
        urls = tuple(expand_urls(url))
        if not urls:
            raise DatasetError(f"shard pattern {url!r} expands to no URLs: check the braces")
        manifest: Manifest | None = None
        sizes: tuple[int, ...] | None = None
        parents = {u.rsplit("/", 1)[0] for u in urls}
        if len(parents) == 1:  # the shards of one dataset folder: take counts and metadata from its manifest
            try:
                manifest = read_manifest(parents.pop())
            except DatasetError:
                manifest = None
            if manifest is not None:
                counts = {s.name: s.num_samples for s in manifest.shards}
                names = [u.rsplit("/", 1)[-1] for u in urls]
                sizes = tuple(counts[n] for n in names) if all(n in counts for n in names) else None
        return ShardSource(url, urls, sizes, manifest)
    root = dataset_root(url)
    manifest = read_manifest(root)
    if not manifest.shards:
        raise DatasetError(f"dataset {root!r} lists no shards: re-write it with `ganpipe data shards`")
    if manifest.channels not in PIL_MODES:
        raise DatasetError(f"dataset {root!r} has channels={manifest.channels}; supported: 1, 3 or 4")
    return ShardSource(
        url,
        tuple(f"{root}/{s.name}" for s in manifest.shards),
        tuple(s.num_samples for s in manifest.shards),
        manifest,
    )


# ------------------------------------------------------------------------------------------------------------
# The schedule: which shard each slot reads at each visit


_M64 = (1 << 64) - 1
_SALT_SHUFFLE, _SALT_FLIP, _SALT_CROP, _SALT_SHARD, _SALT_RESEED = 1, 2, 3, 4, 5


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """A 64-bit hash of integers: O(1) random access into the stream's randomness (no generator state)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _M64))
    return h


class ShardSchedule:
    """`shard(slot, visit)`: the shard a slot reads at a visit, or None when a `once` slot is done."""

    def __init__(self, num_shards: int, num_slots: int, seed: int, mode: StreamMode) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.num_shards, self.num_slots, self.seed, self.mode = num_shards, num_slots, seed, mode
        if mode == "epochs" and num_shards < num_slots:
            raise DatasetError(
                f"{num_shards} shards cannot feed {num_slots} ranks x workers without resampling: "
                "set data.resample=true, use fewer data.num_workers, or write more, smaller shards"
            )
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def per_slot(self, slot: int) -> int:
        """Shards one slot reads per epoch (or in total, for `once`)."""
        return len(range(slot, self.num_shards, self.num_slots))

    def shard(self, slot: int, visit: int) -> int | None:
        if self.mode == "resample":
            return mix(self.seed, slot, visit, _SALT_SHARD) % self.num_shards
        if self.mode == "once":
            index = slot + visit * self.num_slots
            return index if index < self.num_shards else None
        epoch, j = divmod(visit, self.per_slot(slot))
        if epoch != self._perm_epoch:  # one permutation per epoch, cached: slots walk through epochs in order
            self._perm = np.random.default_rng([self.seed, epoch, _SALT_SHARD]).permutation(self.num_shards)
            self._perm_epoch = epoch
        return int(self._perm[slot + j * self.num_slots])


# ------------------------------------------------------------------------------------------------------------
# Positions, counters and reports


class SlotReport(NamedTuple):
    """A slot's position after the samples of the item it travels with, and its cumulative counters.

    A NamedTuple of builtins: Lightning moves batches to the device through it untouched (no tensor, no sync).
    """

    slot: int
    visit: int
    offset: int
    good: int
    bad: tuple[int, ...]  # per BAD_KINDS
    shards_read: int
    worst: tuple[tuple[str, int], ...]  # up to _WORST_SHARDS (shard name, bad samples), worst first


@dataclass
class _Counters:
    good: int = 0
    bad: list[int] = field(default_factory=lambda: [0] * len(BAD_KINDS))
    shards_read: int = 0
    per_shard: dict[int, int] = field(default_factory=dict)  # shard index -> bad samples (bounded by #shards)


class _BadLog:
    """Logs bad data with shard and key: the first few of each kind, then one summary line per kind and interval.
    Never sleeps; a flood of bad samples costs one dict lookup each."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.seen: dict[str, int] = {}
        self.suppressed: dict[str, int] = {}
        self.last: dict[str, float] = {}

    def __call__(self, kind: str, shard: str, key: str | None, detail: str) -> None:
        n = self.seen.get(kind, 0) + 1
        self.seen[kind] = n
        now = time.monotonic()
        where = f"{shard}" + (f" key {key!r}" if key is not None else "")
        if n <= _LOG_FIRST:
            log.warning("skipped bad data (%s) in %s: %s", kind, where, detail)
            self.last[kind] = now
        elif now - self.last.get(kind, 0.0) >= self.interval_s:
            more = self.suppressed.pop(kind, 0)
            log.warning("skipped bad data (%s) in %s: %s (%d more of this kind not shown)", kind, where, detail, more)
            self.last[kind] = now
        else:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1


# ------------------------------------------------------------------------------------------------------------
# Reading one shard


class _ShardFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _storage_options(protocol: str, options: StreamOptions) -> dict[str, Any]:
    """Timeouts per protocol, so a stalled server costs `io_timeout_s`, not forever. Our own retry loop
    replaces the client's, so a dead shard costs `retries` attempts, not retries x client retries."""
    t = options.io_timeout_s
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": t, "read_timeout": t, "retries": {"max_attempts": 1}}}
    if protocol in ("gs", "gcs"):
        return {"timeout": t}
    return {}


class _Prefixed:
    """A read-only file whose first bytes were already read (to probe the shard): tarfile only needs read()."""

    def __init__(self, head: bytes, fh: Any) -> None:
        self._head, self._fh = head, fh

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._fh.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._fh.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out + self._fh.read(n - len(out)) if len(out) < n else out

    def close(self) -> None:
        self._fh.close()

    def __repr__(self) -> str:
        return f"<shard {getattr(self._fh, 'path', self._fh)!r}>"


def _open_shard(url: str, options: StreamOptions) -> _Prefixed:
    """Open a shard for sequential reading and read its first block, retrying with exponential backoff.

    http(s) is read as one streaming GET (block_size=0): no range requests, so any web server works and a
    shard costs one request; other filesystems read ahead `block_size` bytes per request.
    """
    protocol = fsspec.utils.get_protocol(url)
    block_size = 0 if protocol in ("http", "https") else options.block_size
    last: BaseException | None = None
    for attempt in range(options.retries):
        if attempt:
            time.sleep(options.retry_backoff_s * 2 ** (attempt - 1))
        try:
            fs, path = fsspec.core.url_to_fs(url, **_storage_options(protocol, options))
            fh = fs.open(path, "rb", block_size=block_size)
            try:
                # Some backends only answer 404 or time out on the first read, not at open: probe inside the retry.
                head = fh.read(512)
            except BaseException:
                fh.close()
                raise
            return _Prefixed(head, fh)
        except Exception as e:  # OSError (404 = FileNotFoundError, timeouts), and client-library errors
            last = e
    raise _ShardFailure("shard_unreadable", f"{type(last).__name__}: {last}".strip())


def _iter_shard(url: str, options: StreamOptions) -> Iterator[dict[str, Any]]:
    """Raw samples (dicts of member bytes keyed by extension, plus __key__) in tar order; raises _ShardFailure."""
    fh = _open_shard(url, options)
    try:
        files = tar_file_iterator(fh)
        try:
            yield from group_by_keys(_with_url(files, url))
        except (tarfile.TarError, EOFError, ValueError) as e:  # ValueError: duplicate member names
            raise _ShardFailure("truncated_tar", f"{type(e).__name__}: {str(e).split(' @ ')[0]}") from None
        except (OSError, TimeoutError) as e:
            raise _ShardFailure("shard_unreadable", f"{type(e).__name__}: {e}") from None
        except Exception as e:  # client-library errors mid-stream (aiohttp payload errors, ...)
            raise _ShardFailure("shard_unreadable", f"{type(e).__name__}: {e}") from None
    finally:
        fh.close()


def _with_url(files: Iterable[dict[str, Any]], url: str) -> Iterator[dict[str, Any]]:
    for f in files:
        f["__url__"] = url  # group_by_keys expects it (webdataset's opener adds it)
        yield f


def _guarded(items: Iterator[dict[str, Any]], failures: list[_ShardFailure]) -> Iterator[dict[str, Any]]:
    """Stop at a shard failure and record it, so the shuffle buffer can still emit what was read."""
    try:
        yield from items
    except _ShardFailure as f:
        failures.append(f)


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A bounded shuffle buffer; its output is a function of the input and the rng's seed only."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------------------------------------------------
# One slot: shard visits -> decoded good samples, with position and counters


@dataclass(frozen=True)
class _DecodeSpec:
    resolution: int | None  # None: any size (inspection); else smaller -> wrong_size, larger -> cropped
    channels: int
    xflip: bool
    crop: str
    has_labels: bool | None  # None: unknown (no manifest): a label is read when present
    num_classes: int | None
    has_captions: bool | None


class _Sample(NamedTuple):
    image: np.ndarray  # uint8 [H, W, C], possibly a read-only crop view of the decoder's output
    flip: bool  # to be mirrored left-right where it is copied into its batch (`_put_image`)
    label: int
    caption: str
    key: str


_MAX_CONSECUTIVE_BAD = 10_000  # an endless stream of nothing but bad samples is an error, not a slow loop


class _SlotReader:
    def __init__(self, ds: StreamDataset, slot: int, visit: int, offset: int) -> None:
        self.ds, self.slot = ds, slot
        self.visit, self.offset = visit, offset
        self.counters = _Counters()
        self.badlog = _BadLog(ds.options.log_interval_s)

    def report(self) -> SlotReport:
        c = self.counters
        worst = sorted(c.per_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:_WORST_SHARDS]
        return SlotReport(
            self.slot,
            self.visit,
            self.offset,
            c.good,
            tuple(c.bad),
            c.shards_read,
            tuple((self.ds.source.shard_name(i), n) for i, n in worst),
        )

    def _bad(self, kind: str, shard: int, key: str | None, detail: str, n: int = 1) -> None:
        c = self.counters
        c.bad[_KIND_INDEX[kind]] += n
        c.per_shard[shard] = c.per_shard.get(shard, 0) + n
        self.badlog(kind, self.ds.source.shard_urls[shard], key, detail)

    def samples(self) -> Iterator[_Sample]:
        """Good samples; self.visit/offset follow each one (the position just after it)."""
        ds, src = self.ds, self.ds.source
        visit, skip = self.visit, self.offset
        failed_visits = consecutive_bad = 0
        while True:
            shard = ds.schedule.shard(self.slot, visit)
            if shard is None:
                return
            url = src.shard_urls[shard]
            failures: list[_ShardFailure] = []
            rng = random.Random(mix(ds.seed, self.slot, visit, _SALT_SHUFFLE))
            raw = _shuffled(_guarded(_iter_shard(url, ds.options), failures), ds.options.shuffle_buffer, rng)
            n_raw = 0
            for offset, sample in enumerate(raw):
                n_raw += 1
                if offset < skip:
                    continue  # resuming: replay the visit's order without decoding what was already consumed
                self.visit, self.offset = visit, offset + 1
                item = self._decode(sample, shard, visit, offset)
                if item is None:
                    consecutive_bad += 1
                    if consecutive_bad >= _MAX_CONSECUTIVE_BAD and ds.schedule.mode != "once":
                        raise DatasetError(
                            f"the last {consecutive_bad} samples of {src.url!r} were all bad (see the log): "
                            "fix the data or point data.url at another dataset"
                        )
                    continue
                consecutive_bad = 0
                yield item
            skip = 0
            expected = src.shard_sizes[shard] if src.shard_sizes is not None else None
            if not failures and expected is not None and n_raw < expected:
                # tarfile ends silently at a header cut short; the manifest's count tells the shard is truncated.
                failures.append(_ShardFailure("truncated_tar", f"ends after {n_raw} of {expected} samples"))
            if failures:
                f = failures[0]
                lost = max(expected - n_raw, 1) if expected is not None else 1
                self._bad(f.kind, shard, None, str(f), n=lost)
                failed_visits = failed_visits + 1 if n_raw == 0 else 0
                if failed_visits >= min(src.num_shards, 20) and ds.schedule.mode != "once":
                    raise DatasetError(
                        f"{failed_visits} shard reads of {src.url!r} failed in a row (last: {url}: {f}): "
                        "check the URL, credentials and network"
                    )
            else:
                self.counters.shards_read += 1
                failed_visits = 0
            visit += 1
            self.visit, self.offset = visit, 0

    def _decode(self, raw: dict[str, Any], shard: int, visit: int, offset: int) -> _Sample | None:
        spec = self.ds.spec
        key = raw.get("__key__", "?")
        data = next((raw[e] for e in IMAGE_EXTENSIONS if e in raw), None)
        if data is None:
            self._bad("missing_image", shard, key, f"members {sorted(k for k in raw if not k.startswith('__'))}")
            return None
        label = -1
        cls = raw.get("cls")
        if cls is None:
            if spec.has_labels:
                self._bad("missing_label", shard, key, "no .cls member")
                return None
        else:
            try:
                label = int(cls)
            except ValueError:
                self._bad("bad_label", shard, key, f".cls is {bytes(cls[:20])!r}")
                return None
            if label < 0 or (spec.num_classes is not None and spec.has_labels and label >= spec.num_classes):
                self._bad("bad_label", shard, key, f"label {label} outside [0, {spec.num_classes})")
                return None
        caption = ""
        txt = raw.get("txt")
        if txt is None:
            if spec.has_captions:
                self._bad("missing_caption", shard, key, "no .txt member")
                return None
        else:
            try:
                caption = txt.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad("bad_caption", shard, key, f".txt is not UTF-8 ({e.reason} at byte {e.start})")
                return None
        try:
            image = decode_array(data, spec.channels)
        except ImageDecodeError as e:
            self._bad(e.kind, shard, key, str(e))
            return None
        r = spec.resolution
        if r is not None:
            h, w = image.shape[:2]
            if h < r or w < r:
                self._bad("wrong_size", shard, key, f"{w}x{h} is smaller than {r}x{r}")
                return None
            if h > r or w > r:
                if spec.crop == "random":
                    hsh = mix(self.ds.seed, self.slot, visit, offset, _SALT_CROP)
                    y, x = (hsh & 0xFFFFFFFF) % (h - r + 1), (hsh >> 32) % (w - r + 1)
                else:
                    y, x = (h - r) // 2, (w - r) // 2
                image = image[y : y + r, x : x + r]
        flip = spec.xflip and bool(mix(self.ds.seed, self.slot, visit, offset, _SALT_FLIP) & 1)
        self.counters.good += 1
        return _Sample(image, flip, label, caption, key)


# ------------------------------------------------------------------------------------------------------------
# The dataset and its loader


class StreamDataset:
    """The stream of one rank (see the module docstring); `StreamLoader` runs it over its worker processes.

    With `batch_size`, yields batches {"image": uint8 [B, C, H, W] (channels_last memory format), "label": int64
    numpy [B] (-1 = none; `StreamLoader` hands it out as a tensor), "caption": list[str], "key": list[str],
    "stream": SlotReport}, each passed through `transform` (run in the worker process, so it must pickle for the
    forkserver and spawn start methods; numpy arrays it adds reach the trainer as tensors); without, single samples
    ("image" uint8 [C, H, W], "label" int). In `once` mode each worker's stream ends with one item holding only
    "stream" (its final counters; `read_once` consumes it)."""

    def __init__(
        self,
        source: ShardSource,
        *,
        seed: int,
        batch_size: int | None,
        resolution: int | None,
        mode: StreamMode = "resample",
        xflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        positions: list[tuple[int, int]] | None = None,
        rotation: int = 0,
        num_batches: int | None = None,
        options: StreamOptions | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_batches is not None and (num_batches < 0 or batch_size is None or mode == "once"):
            raise ValueError("num_batches needs a batch_size and an endless mode, and must be >= 0")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.source, self.seed, self.batch_size, self.mode = source, seed, batch_size, mode
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.slots_per_rank = max(1, num_workers)
        self.options = options or StreamOptions()
        self.schedule = ShardSchedule(source.num_shards, world_size * self.slots_per_rank, seed, mode)
        m = source.manifest
        channels = m.channels if m is not None else 3
        self.spec = _DecodeSpec(
            resolution=resolution,
            channels=channels,
            xflip=xflip,
            crop=self.options.crop,
            has_labels=m.has_labels if m is not None else None,
            num_classes=m.num_classes if m is not None else None,
            has_captions=m.has_captions if m is not None else None,
        )
        self.positions = list(positions) if positions is not None else [(0, 0)] * self.slots_per_rank
        if len(self.positions) != self.slots_per_rank:
            raise ValueError(f"{len(self.positions)} positions for {self.slots_per_rank} slots per rank")
        self.rotation, self.num_batches = rotation, num_batches
        self.transform = transform

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless stream has no length")
        return self.num_batches

    def slot_of_worker(self, worker: int) -> int:
        """The global slot that loader worker `worker` of this rank serves."""
        return self.rank * self.slots_per_rank + (worker + self.rotation) % self.slots_per_rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The whole stream in this process (a dataset built for num_workers <= 1)."""
        if self.slots_per_rank != 1:
            raise RuntimeError(f"a StreamDataset for num_workers={self.num_workers} is iterated by StreamLoader")
        return self.worker_items(0, None)

    def worker_items(self, worker: int, pool: BufferPool | None) -> Iterator[dict[str, Any]]:
        """The items of loader worker `worker`; batches are built in `pool`'s shared-memory buffers if given
        (in a worker process), else in fresh ones."""
        slot = self.slot_of_worker(worker)
        visit, offset = self.positions[slot - self.rank * self.slots_per_rank]
        reader = _SlotReader(self, slot, visit, offset)
        quota = None if self.num_batches is None else len(range(worker, self.num_batches, self.slots_per_rank))
        if quota == 0:
            return
        samples = reader.samples()
        if self.batch_size is None:
            for s in samples:
                hwc = np.empty((1, *s.image.shape), dtype=np.uint8)
                _put_image(hwc, 0, s)
                image = torch.from_numpy(hwc[0]).permute(2, 0, 1)  # [C, H, W] view of HWC memory (channels_last)
                yield {"image": image, "label": s.label, "caption": s.caption, "key": s.key, "stream": reader.report()}
        else:
            for batch in self._batches(samples, reader, quota, pool):
                yield self.transform(batch) if self.transform is not None else batch
        if self.mode == "once":
            yield {"stream": reader.report()}

    def _batches(
        self, samples: Iterator[_Sample], reader: _SlotReader, quota: int | None, pool: BufferPool | None
    ) -> Iterator[dict[str, Any]]:
        """Batches of `batch_size`; images are copied into one [B, H, W, C] buffer (from `pool` inside a
        worker) and handed out as its [B, C, H, W] view, i.e. in channels_last memory format: an HWC -> CHW
        copy would cost a sixth of a 256px JPEG decode, and convolutions take channels_last as it is."""
        assert self.batch_size is not None
        b, n = self.batch_size, 0
        images: torch.Tensor | None = None
        pool_slot: int | None = None
        view = np.empty(0, dtype=np.uint8)
        labels: list[int] = []
        captions: list[str] = []
        keys: list[str] = []
        for s in samples:
            if images is None:
                shape = (b, *s.image.shape)
                images, pool_slot = (
                    pool.acquire(shape) if pool is not None else (torch.empty(shape, dtype=torch.uint8), None)
                )
                view = images.numpy()
            if s.image.shape != images.shape[1:]:
                # Without a resolution (inspection) sizes may differ; a batch needs one size.
                raise DatasetError(
                    f"sample {s.key!r} is {s.image.shape[1]}x{s.image.shape[0]}: batching needs data.resolution"
                )
            _put_image(view, len(keys), s)
            labels.append(s.label)
            captions.append(s.caption)
            keys.append(s.key)
            if len(keys) == b:
                yield self._batch(_handed(images, pool, pool_slot, b), labels, captions, keys, reader)
                n += 1
                if quota is not None and n >= quota:
                    return
                images, labels, captions, keys = None, [], [], []
        if keys and self.mode == "once" and images is not None:  # evaluation keeps the last, partial batch
            yield self._batch(_handed(images, pool, pool_slot, len(keys)), labels, captions, keys, reader)

    @staticmethod
    def _batch(
        images: torch.Tensor | PooledImages,
        labels: list[int],
        captions: list[str],
        keys: list[str],
        reader: _SlotReader,
    ) -> dict[str, Any]:
        return {
            "image": images,
            # numpy, not a tensor: a tensor would cross to the trainer through a shared-memory segment of its own
            # (one more allocation and file-descriptor hand-over per batch); the loader makes it a tensor.
            "label": np.array(labels, dtype=np.int64),
            "caption": captions,
            "key": keys,
            "stream": reader.report(),
        }


def _handed(buffer: torch.Tensor, pool: BufferPool | None, slot: int | None, count: int) -> torch.Tensor | PooledImages:
    """The first `count` images of a [B, H, W, C] batch buffer as [count, C, H, W] (channels_last), or, for a
    pooled buffer, what stands for them until they reach the trainer."""
    if pool is not None and slot is not None:
        return pool.images(slot, count)
    return buffer[:count].permute(0, 3, 1, 2)


def _put_image(batch: np.ndarray, index: int, sample: _Sample) -> None:
    """Copy a sample's image to `batch[index]` ([N, H, W, C] uint8), mirrored left-right if the sample says so.
    The mirror runs on the written copy, in torch: 19 us for a 256px image here, against 25 us for PIL's
    transpose (a pass over its 4-byte pixels before packing) and 80-200 us for numpy's reversed copies."""
    batch[index] = sample.image
    if sample.flip:
        written = torch.from_numpy(batch[index])
        written.copy_(written.flip(1))


# ------------------------------------------------------------------------------------------------------------
# Stream state in checkpoints, and the monitor the training task keeps


@dataclass
class StreamState:
    """Where every slot of the job stands: stored in the checkpoint's `data.stream` (builtins only)."""

    seed: int
    world_size: int
    slots_per_rank: int
    mode: str
    source: str  # ShardSource.fingerprint
    positions: list[list[int]]  # [slot] -> [visit, offset]; slot = rank * slots_per_rank + worker slot

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        return cls(
            seed=int(data["seed"]),
            world_size=int(data["world_size"]),
            slots_per_rank=int(data["slots_per_rank"]),
            mode=str(data["mode"]),
            source=str(data["source"]),
            positions=[[int(v), int(o)] for v, o in data["positions"]],
        )


def resume_stream_state(
    saved: dict[str, Any] | None,
    *,
    source: ShardSource,
    seed: int,
    world_size: int,
    slots_per_rank: int,
    mode: str,
    cur_nimg: int,
) -> StreamState:
    """The state to start from: the saved one when the topology and data match; otherwise a fresh stream whose
    seed is derived from (seed, cur_nimg), logged (a new run, cur_nimg = 0, simply starts with `seed`)."""
    fresh_positions = [[0, 0] for _ in range(world_size * slots_per_rank)]
    stream = (saved or {}).get("stream")
    if stream is not None:
        try:
            state = StreamState.from_dict(stream)
        except (KeyError, TypeError, ValueError):
            state = None
        if state is not None:
            same = (state.world_size, state.slots_per_rank, state.mode, state.source) == (
                world_size,
                slots_per_rank,
                mode,
                source.fingerprint,
            )
            if same and len(state.positions) == world_size * slots_per_rank:
                return state
            log.warning(
                "data stream saved for %d ranks x %d workers (%s, shards %s) "
                "cannot continue on %d x %d (%s, shards %s)",
                state.world_size,
                state.slots_per_rank,
                state.mode,
                state.source,
                world_size,
                slots_per_rank,
                mode,
                source.fingerprint,
            )
    if cur_nimg == 0 and stream is None:
        return StreamState(seed, world_size, slots_per_rank, mode, source.fingerprint, fresh_positions)
    new_seed = mix(seed, cur_nimg, _SALT_RESEED) & 0x7FFFFFFF
    log.warning(
        "data stream restarts at %.1f kimg with fresh seed %d (exact resume needs the saved topology)",
        cur_nimg / 1000,
        new_seed,
    )
    return StreamState(new_seed, world_size, slots_per_rank, mode, source.fingerprint, fresh_positions)


class StreamMonitor:
    """Follows one rank's slots through the `SlotReport`s of the batches the trainer consumed.

    - `positions()`: this rank's [slots_per_rank, 2] positions (start positions until a slot reports);
    - `counters()`: int64 [2 + len(BAD_KINDS)]: good, shards read, bad per kind, including what previous
      sessions of the run counted (`base`), so the totals survive resumes;
    - `check(totals)`: raises `DatasetError` naming the worst shards when the bad fraction is over the limit.
    """

    def __init__(self, state: StreamState, rank: int, options: StreamOptions, base: list[int] | None = None) -> None:
        self.state, self.rank, self.options = state, rank, options
        k = state.slots_per_rank
        self._start = [tuple(p) for p in state.positions[rank * k : (rank + 1) * k]]
        self._reports: dict[int, SlotReport] = {}
        n = 2 + len(BAD_KINDS)
        # Totals of earlier sessions enter once, on rank 0, so that summing over ranks counts them once.
        self.base = list(base) if base is not None and len(base) == n and rank == 0 else [0] * n

    def update(self, report: SlotReport) -> None:
        self._reports[int(report.slot)] = report

    def positions(self) -> torch.Tensor:
        k = self.state.slots_per_rank
        out = torch.zeros((k, 2), dtype=torch.int64)
        for i in range(k):
            r = self._reports.get(self.rank * k + i)
            out[i] = torch.tensor([r.visit, r.offset] if r is not None else list(self._start[i]))
        return out

    def counters(self) -> torch.Tensor:
        total = list(self.base)
        for r in self._reports.values():
            total[0] += r.good
            total[1] += r.shards_read
            for i, n in enumerate(r.bad):
                total[2 + i] += n
        return torch.tensor(total, dtype=torch.int64)

    def worst_shards(self) -> list[tuple[str, int]]:
        merged: dict[str, int] = {}
        for r in self._reports.values():
            for name, n in r.worst:
                merged[name] = merged.get(name, 0) + n
        return sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:_WORST_SHARDS]

    @staticmethod
    def log_values(totals: torch.Tensor) -> dict[str, float]:
        good, bad = int(totals[0]), int(totals[2:].sum())
        values = {"Data/good": float(good), "Data/bad": float(bad), "Data/bad_fraction": bad / max(good + bad, 1)}
        values.update({f"Data/bad/{k}": float(totals[2 + i]) for i, k in enumerate(BAD_KINDS)})
        return values

    def check(self, totals: torch.Tensor) -> None:
        good, bad = int(totals[0]), int(totals[2:].sum())
        seen = good + bad
        if seen < self.options.bad_check_min_samples or bad <= self.options.max_bad_fraction * seen:
            return
        kinds = ", ".join(f"{k} {int(totals[2 + i])}" for i, k in enumerate(BAD_KINDS) if int(totals[2 + i]))
        worst = ", ".join(f"{name} ({n})" for name, n in self.worst_shards()) or "none on this rank"
        raise DatasetError(
            f"too many bad samples: {bad} of {seen} ({bad / seen:.1%}) > data.max_bad_fraction="
            f"{self.options.max_bad_fraction} [{kinds}]; worst shards: {worst}. Fix or drop those shards "
            "(`ganpipe data inspect URL`), or raise data.max_bad_fraction"
        )

    def state_dict(self, all_positions: torch.Tensor, totals: torch.Tensor) -> dict[str, Any]:
        """The checkpoint's `data.stream` and `data.counters` from every rank's gathered positions and totals."""
        state = dataclasses.replace(self.state, positions=all_positions.reshape(-1, 2).tolist())
        return {"stream": state.to_dict(), "counters": totals.tolist()}


def build_train_stream(
    url: str,
    *,
    batch_size: int,
    seed: int,
    resolution: int,
    num_batches: int,
    steps_done: int,
    cur_nimg: int,
    saved: dict[str, Any] | None = None,
    xflip: bool = False,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    options: StreamOptions | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[StreamLoader, StreamMonitor]:
    """This rank's training loader (`num_batches` batches of `batch_size`) and the monitor that follows it.

    `saved` is the checkpoint's `data` entry (None for a new run); `steps_done` is how many batches each rank
    consumed before (it sets the worker rotation); `cur_nimg` seeds a fresh stream when `saved` cannot be used;
    `transform` runs on every batch in the workers (e.g. tokenizing captions).
    """
    options = options or StreamOptions()
    options.validate()
    source = open_source(url)
    mode: StreamMode = "resample" if options.resample else "epochs"
    k = max(1, num_workers)
    state = resume_stream_state(
        saved, source=source, seed=seed, world_size=world_size, slots_per_rank=k, mode=mode, cur_nimg=cur_nimg
    )
    dataset = StreamDataset(
        source,
        seed=state.seed,
        batch_size=batch_size,
        resolution=resolution,
        mode=mode,
        xflip=xflip,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        positions=[(int(v), int(o)) for v, o in state.positions[rank * k : (rank + 1) * k]],
        rotation=steps_done % k,
        num_batches=num_batches,
        options=options,
        transform=transform,
    )
    base = (saved or {}).get("counters")
    monitor = StreamMonitor(state, rank, options, base=list(base) if base is not None else None)
    return StreamLoader(dataset), monitor


# ------------------------------------------------------------------------------------------------------------
# Reading every sample once


@dataclass
class StreamStats:
    """What a `once` pass saw: good samples, bad samples per kind, shards read, worst shards."""

    good: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))
    shards_read: int = 0
    worst_shards: list[tuple[str, int]] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())


class OnceReader:
    """Iterates every sample (or batch) of a dataset exactly once, over `num_workers` processes; `stats` is
    complete when the iteration ends. Evaluation and `ganpipe data inspect` read data through this."""

    def __init__(self, dataset: StreamDataset) -> None:
        self.dataset = dataset
        self.stats = StreamStats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        finals: dict[int, SlotReport] = {}
        for item in StreamLoader(self.dataset, pin_memory=False):
            report: SlotReport = item["stream"]
            if len(item) == 1:  # a worker's trailer: its final counters
                finals[report.slot] = report
                continue
            yield item
        stats = StreamStats()
        worst: dict[str, int] = {}
        for r in finals.values():
            stats.good += r.good
            stats.shards_read += r.shards_read
            for k, n in zip(BAD_KINDS, r.bad, strict=True):
                stats.bad[k] += n
            for name, n in r.worst:
                worst[name] = worst.get(name, 0) + n
        stats.worst_shards = sorted(worst.items(), key=lambda kv: (-kv[1], kv[0]))[:_WORST_SHARDS]
        self.stats = stats


def read_once(
    url: str | ShardSource,
    *,
    batch_size: int | None = None,
    resolution: int | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    options: StreamOptions | None = None,
) -> OnceReader:
    """Every sample of `url` once (this rank's share of the shards, in shard order, unshuffled, unflipped)."""
    source = url if isinstance(url, ShardSource) else open_source(url)
    options = dataclasses.replace(options or StreamOptions(), shuffle_buffer=0)
    dataset = StreamDataset(
        source,
        seed=0,
        batch_size=batch_size,
        resolution=resolution,
        mode="once",
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        options=options,
    )
    return OnceReader(dataset)


__all__ = [
    "BAD_KINDS",
    "MODES",
    "OnceReader",
    "ShardSchedule",
    "ShardSource",
    "SlotReport",
    "StreamDataset",
    "StreamLoader",
    "StreamMonitor",
    "StreamOptions",
    "StreamState",
    "StreamStats",
    "build_train_stream",
    "mix",
    "open_source",
    "read_once",
    "resume_stream_state",
]
