"""Random access to the samples of a shard dataset: `ShardDataset(url)[i]`.

Training does not read through this module: it streams (`pipeline.data.stream`), which needs no index and
works at any scale. This reader exists for what a stream cannot do: looking at sample i (tests, debugging,
notebooks, fixed reference sets on small data). It indexes every tar member once (offsets from `tarfile`,
through fsspec, which reads every header: fine for thousands of samples, slow for millions on object stores)
and then reads one sample with a single seek + read. File handles are opened lazily in the process that reads,
so the dataset pickles cheaply into DataLoader workers. It decodes with the stream's decoder (`codec`).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.codec import PIL_MODES, decode_array
from pipeline.data.shards import Manifest, dataset_root, read_manifest
from pipeline.errors import DatasetError

# Open shard files kept per process: enough for random access over many shards without running out of fds.
_MAX_OPEN_FILES = 64


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """Encoded image -> uint8 [C, H, W] with `channels` channels; raises `codec.ImageDecodeError`."""
    return torch.from_numpy(np.ascontiguousarray(decode_array(data, channels).transpose(2, 0, 1)))


@dataclass
class _ShardIndex:
    """Per-sample locations inside one shard: a contiguous byte range holding all of the sample's members."""

    keys: list[str]
    start: np.ndarray  # int64 offset of the first member's data
    length: np.ndarray  # int64 bytes from `start` to the end of the last member's data
    members: np.ndarray  # int64 [n, 3, 2]: (offset relative to `start`, size) of image, cls, txt; size -1 = absent


def _index_shard(url: str, image_ext: str) -> _ShardIndex:
    fs, path = fsspec.core.url_to_fs(url)
    exts = {image_ext: 0, "cls": 1, "txt": 2}
    order: list[str] = []
    found: dict[str, dict[int, tuple[int, int]]] = {}
    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot of the basename
                if not dot or ext not in exts:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                if key not in found:
                    found[key] = {}
                    order.append(key)
                found[key][exts[ext]] = (member.offset_data, member.size)
    except FileNotFoundError:
        raise DatasetError(
            f"shard {url!r} listed in the manifest is missing: re-copy or re-write the dataset"
        ) from None
    except tarfile.TarError as e:
        raise DatasetError(f"shard {url!r} is not a readable tar ({e}): re-copy or re-write it") from None
    n = len(order)
    members = np.full((n, 3, 2), -1, dtype=np.int64)
    start = np.zeros(n, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    for i, key in enumerate(order):
        parts = found[key]
        if 0 not in parts:
            raise DatasetError(f"sample {key!r} in shard {url!r} has no .{image_ext} member: re-write the shard")
        lo = min(off for off, _ in parts.values())
        hi = max(off + size for off, size in parts.values())
        start[i], length[i] = lo, hi - lo
        for slot, (off, size) in parts.items():
            members[i, slot] = (off - lo, size)
    return _ShardIndex(order, start, length, members)


class ShardDataset(Dataset):
    """Map-style dataset over every sample of every shard listed in `{url}/manifest.json`.

    `ds[i]` or `ds[(i, xflip)]` -> {"image": uint8 [C, H, W], "label": int64 scalar (-1 without labels),
    "caption": str ("" without captions), "key": str}; xflip mirrors the image horizontally.
    """

    def __init__(self, url: str) -> None:
        self.url = dataset_root(url)
        self.manifest: Manifest = read_manifest(self.url)
        m = self.manifest
        if m.channels not in PIL_MODES:
            raise DatasetError(f"dataset {self.url!r} has channels={m.channels}; supported: 1, 3 or 4")
        self.shard_urls = [f"{self.url}/{s.name}" for s in m.shards]
        # Indexing is latency-bound on object stores (a header read per member), so shards are read in parallel.
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(self.shard_urls)))) as pool:
            indexes = list(pool.map(lambda u: _index_shard(u, m.image_format), self.shard_urls))
        for shard, index, shard_url in zip(m.shards, indexes, self.shard_urls, strict=True):
            if len(index.keys) != shard.num_samples:
                raise DatasetError(
                    f"shard {shard_url!r} holds {len(index.keys)} samples but the manifest says {shard.num_samples}: "
                    "re-copy the dataset"
                )
        self._shard = np.concatenate([np.full(len(ix.keys), i, dtype=np.int32) for i, ix in enumerate(indexes)])
        self._start = np.concatenate([ix.start for ix in indexes])
        self._length = np.concatenate([ix.length for ix in indexes])
        self._members = np.concatenate([ix.members for ix in indexes])
        self._keys = [k for ix in indexes for k in ix.keys]
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    @property
    def resolution(self) -> int:
        return self.manifest.resolution

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # open handles never cross a process boundary
        return state

    def _file(self, shard: int) -> Any:
        if self._pid != os.getpid():  # forked after handles were opened: the parent's offsets are not ours
            self._files = OrderedDict()
            self._pid = os.getpid()
        fh = self._files.get(shard)
        if fh is None:
            fs, path = fsspec.core.url_to_fs(self.shard_urls[shard])
            # No read-ahead: each read is one sample, and a multi-MB read-ahead per sample would dominate on S3.
            fh = fs.open(path, "rb", cache_type="none")
            self._files[shard] = fh
            if len(self._files) > _MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return fh

    def read_raw(self, index: int) -> bytes:
        """The bytes of sample `index`'s members, as one contiguous slice of its shard."""
        fh = self._file(int(self._shard[index]))
        fh.seek(int(self._start[index]))
        data = fh.read(int(self._length[index]))
        if len(data) != self._length[index]:
            raise DatasetError(f"shard {self.shard_urls[self._shard[index]]!r} is truncated: re-copy it")
        return data

    def __getitem__(self, key: int | tuple[int, bool]) -> dict[str, Any]:
        index, xflip = (key[0], bool(key[1])) if isinstance(key, tuple) else (key, False)
        index = int(index)
        n = len(self._keys)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sample index {key!r} out of range for {n} samples")
        data = self.read_raw(index)
        members = self._members[index]
        off, size = (int(v) for v in members[0])
        image = decode_image(data[off : off + size], self.manifest.channels)
        if xflip:
            image = image.flip(-1)
        off, size = (int(v) for v in members[1])
        label = int(data[off : off + size]) if size >= 0 else -1
        off, size = (int(v) for v in members[2])
        caption = data[off : off + size].decode("utf-8") if size >= 0 else ""
        return {
            "image": image,
            "label": torch.tensor(label, dtype=torch.int64),
            "caption": caption,
            "key": self._keys[index],
        }
