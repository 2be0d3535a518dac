"""WebDataset tar shards and their `manifest.json`, on any fsspec URL.

Layout of a dataset folder (the URL that `data.url` names):

    {url}/manifest.json                 written last: its presence means every shard it lists is complete
    {url}/{prefix}-000000.tar, ...      WebDataset tars; each sample is the members `{key}.png`,
                                        `{key}.cls` (ASCII integer label) and `{key}.txt` (UTF-8 caption)

Contract:
- Every shard and the manifest are written under a temporary name and renamed when complete, so a killed
  writer never leaves a partial file under a real name.
- Shards are byte-reproducible: member mtimes are fixed, so the same samples give the same sha256.
- `read_manifest` raises `DatasetError` (a `ValueError`) with a one-line message naming the URL and the fix
  when the manifest is missing or malformed. Readers ignore keys they do not know, so writers may add
  optional keys without bumping `FORMAT_VERSION`; a change readers must understand bumps it.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

import fsspec
from webdataset import TarWriter

from pipeline.errors import DatasetError
from pipeline.storage import describe_failure, publish_atomic, storage_failure

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_FORMATS = ("png", "jpg", "webp")
# WebDataset splits a member name at the first dot of its basename into key and extension.
_KEY_RE = re.compile(r"^[^./][^.]*$")


@dataclass
class ShardInfo:
    """One complete shard: its file name (relative to the dataset folder), size and checksum."""

    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a dataset folder holds; `manifest.json` is its JSON form."""

    shards: list[ShardInfo]
    resolution: int
    num_classes: int
    has_labels: bool
    has_captions: bool
    image_format: str = "png"
    channels: int = 3
    class_names: list[str] | None = None
    format_version: int = FORMAT_VERSION
    num_samples: int = field(default=-1)  # -1 = the sum over shards, filled in by __post_init__

    def __post_init__(self) -> None:
        total = sum(s.num_samples for s in self.shards)
        if self.num_samples == -1:
            self.num_samples = total
        elif self.num_samples != total:
            raise ValueError(f"num_samples={self.num_samples} but the shards hold {total} samples")

    def to_json(self) -> str:
        data = asdict(self)
        # Put the summary first so a human reading the file sees it before a long shard list.
        ordered = {k: data[k] for k in ("format_version", "num_samples", "resolution", "channels", "num_classes")}
        ordered.update({k: v for k, v in data.items() if k not in ordered and k != "shards"})
        ordered["shards"] = data["shards"]
        return json.dumps(ordered, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate; raises `ValueError` with a short reason (callers add the URL)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version={version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise ValueError(f"format_version={version} is newer than this ganpipe reads ({FORMAT_VERSION})")

        def get(key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
            if key not in data:
                if default is ...:
                    raise ValueError(f"missing key {key!r}")
                return default
            value = data[key]
            # bool is an int subclass; a count given as true/false is a bug in the writer.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
                raise ValueError(f"{key}={value!r} has the wrong type")
            return value

        raw_shards = get("shards", list)
        shards = []
        for i, s in enumerate(raw_shards):
            if not isinstance(s, dict):
                raise ValueError(f"shards[{i}] is not an object")
            try:
                info = ShardInfo(
                    name=str(s["name"]),
                    num_samples=int(s["num_samples"]),
                    bytes=int(s["bytes"]),
                    sha256=str(s["sha256"]),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"shards[{i}] is incomplete or mistyped ({e!r})") from None
            if info.num_samples < 0 or info.bytes < 0 or "/" in info.name or info.name.startswith("."):
                raise ValueError(f"shards[{i}] is invalid: {s!r}")
            shards.append(info)
        image_format = get("image_format", str, "png")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r} is not one of {IMAGE_FORMATS}")
        class_names = get("class_names", (list, type(None)), None)
        resolution = get("resolution", int)
        if resolution <= 0:
            raise ValueError(f"resolution={resolution} must be positive")
        return cls(  # __post_init__ checks num_samples against the shards
            shards=shards,
            resolution=resolution,
            num_classes=get("num_classes", int),
            has_labels=get("has_labels", bool),
            has_captions=get("has_captions", bool),
            image_format=image_format,
            channels=get("channels", int, 3),
            class_names=[str(c) for c in class_names] if class_names is not None else None,
            format_version=version,
            num_samples=get("num_samples", int),
        )


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def manifest_url(url: str) -> str:
    """The manifest of a dataset folder URL (a URL that already names the manifest is returned unchanged)."""
    url = url.rstrip("/")
    return url if url.endswith("/" + MANIFEST_NAME) or url == MANIFEST_NAME else f"{url}/{MANIFEST_NAME}"


def dataset_root(url: str) -> str:
    """The dataset folder of a folder or manifest URL."""
    url = url.rstrip("/")
    return url[: -len(MANIFEST_NAME) - 1] if url.endswith("/" + MANIFEST_NAME) else url


def read_manifest(url: str) -> Manifest:
    """Read `{url}/manifest.json` (`url` is the dataset folder, or the manifest itself)."""
    murl = manifest_url(url)
    try:
        fs, path = fsspec.core.url_to_fs(murl)
        text = fs.cat_file(path)
    except Exception as e:  # fsspec's backends raise their own types (botocore, aiohttp, gcsfs)
        cause = storage_failure(e, murl)
        if cause is not None:  # no credentials, no such bucket, rejected, unreachable: said the same everywhere
            raise DatasetError(f"cannot read {murl!r}: {describe_failure(cause)}") from None
        if isinstance(e, FileNotFoundError):
            raise DatasetError(
                f"no {MANIFEST_NAME} at {murl!r}: point data.url at a folder written by `ganpipe data` "
                "(or leave data.url null for the built-in synthetic dataset)"
            ) from None
        if not isinstance(e, (OSError, ValueError, ImportError)):
            raise
        raise DatasetError(f"cannot read {murl!r} ({type(e).__name__}: {e}): check the URL and credentials") from None
    try:
        return Manifest.from_json(text)
    except ValueError as e:
        raise DatasetError(f"malformed {murl!r}: {e}; re-write the dataset with `ganpipe data`") from None


def write_manifest(url: str, manifest: Manifest) -> None:
    """Write the manifest of dataset folder `url` atomically (`pipeline.storage.publish_atomic`)."""
    publish_atomic(manifest_url(url), manifest.to_json().encode())


class _HashingFile:
    """A write-only file that forwards to `inner` while counting bytes and hashing them,
    so a shard's size and sha256 are known without reading it back (costly on object stores)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


class ShardWriter:
    """Write samples into `{url}/{prefix}-{000000..}.tar`, a new shard every `samples_per_shard` samples,
    and `manifest.json` when the writer is closed without an error.

        with ShardWriter(url, resolution=32, num_classes=6, has_labels=True, has_captions=True) as w:
            w.write("000000000", png_bytes, label=3, caption="a red circle")
        w.manifest  # the Manifest that was written

    Leaving the `with` block through an exception deletes the shard in progress and writes no manifest.
    """

    def __init__(
        self,
        url: str,
        *,
        resolution: int,
        num_classes: int = 0,
        has_labels: bool = False,
        has_captions: bool = False,
        image_format: str = "png",
        channels: int = 3,
        class_names: list[str] | None = None,
        samples_per_shard: int = 1000,
        prefix: str = "shard",
    ) -> None:
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be positive")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r} is not one of {IMAGE_FORMATS}")
        if not _KEY_RE.match(prefix) or "/" in prefix:
            raise ValueError(f"prefix={prefix!r} must be a plain file name without dots or slashes")
        if has_labels and num_classes <= 0:
            raise ValueError("a labelled dataset needs num_classes > 0")
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self._meta = dict(
            resolution=resolution,
            num_classes=num_classes,
            has_labels=has_labels,
            has_captions=has_captions,
            image_format=image_format,
            channels=channels,
            class_names=class_names,
        )
        self.shards: list[ShardInfo] = []
        self.manifest: Manifest | None = None
        self._file: Any = None
        self._hash: _HashingFile | None = None
        self._tar: TarWriter | None = None
        self._tmp_path = ""
        self._count = 0

    def write(self, key: str, image: bytes, label: int | None = None, caption: str | None = None) -> None:
        """Add one sample; `label` is required exactly when the dataset has labels, `caption` likewise."""
        if self.manifest is not None:
            raise RuntimeError("ShardWriter is closed")
        if not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' (WebDataset splits there)")
        if (label is not None) != self._meta["has_labels"]:
            raise ValueError(f"sample {key!r}: label={label!r} but has_labels={self._meta['has_labels']}")
        if (caption is not None) != self._meta["has_captions"]:
            raise ValueError(f"sample {key!r}: caption={caption!r} but has_captions={self._meta['has_captions']}")
        if label is not None and not 0 <= label < self._meta["num_classes"]:
            raise ValueError(f"sample {key!r}: label={label} is outside [0, {self._meta['num_classes']})")
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        sample: dict[str, Any] = {"__key__": key, self._meta["image_format"]: bytes(image)}
        if label is not None:
            sample["cls"] = str(int(label)).encode("ascii")
        if caption is not None:
            sample["txt"] = caption.encode("utf-8")
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> Manifest:
        """Finish the last shard and write the manifest; returns it. Idempotent."""
        if self.manifest is None:
            self._close_shard()
            self.manifest = Manifest(shards=list(self.shards), **self._meta)
            write_manifest(self.url, self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress (completed shards stay; no manifest is written)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tar = self._file = self._hash = None
                if self.fs.exists(self._tmp_path):
                    self.fs.rm(self._tmp_path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._tmp_path = f"{self.root}/{name}.tmp-{uuid.uuid4().hex[:12]}"
        self._file = self.fs.open(self._tmp_path, "wb")
        self._hash = _HashingFile(self._file)
        # mtime=0 and fixed owner make shards byte-reproducible; encoder=False: members are already bytes.
        self._tar = TarWriter(self._hash, encoder=False, mtime=0, user="ganpipe", group="ganpipe")
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        assert self._hash is not None
        self._tar.close()  # writes the end-of-archive blocks through the hashing file
        self._file.close()
        name = self._shard_name(len(self.shards))
        self.fs.mv(self._tmp_path, f"{self.root}/{name}")
        self.shards.append(ShardInfo(name, self._count, self._hash.bytes, self._hash.sha.hexdigest()))
        self._tar = self._file = self._hash = None
        self._count = 0


def verify_shards(url: str, manifest: Manifest | None = None) -> None:
    """Re-read every shard and check its size and sha256 against the manifest; raises `DatasetError`."""
    root = dataset_root(url)
    manifest = manifest or read_manifest(root)
    for shard in manifest.shards:
        shard_url = f"{root}/{shard.name}"
        fs, path = fsspec.core.url_to_fs(shard_url)
        sha, size = hashlib.sha256(), 0
        try:
            with fs.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    sha.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise DatasetError(f"shard {shard_url!r} listed in the manifest is missing: re-copy the dataset") from None
        if size != shard.bytes or sha.hexdigest() != shard.sha256:
            raise DatasetError(f"shard {shard_url!r} does not match its manifest entry (size or sha256): re-copy it")
