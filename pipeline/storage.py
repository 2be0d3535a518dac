"""Files on any fsspec URL that appear whole or not at all: the one writer for checkpoints, exports, manifests,
metric caches and logs that are rewritten.

Contract
    `publish_atomic(url, data)` makes `data` appear at `url` at once. On a file system with rename (local disk,
    NFS, Lustre, memory://) it writes a hidden temporary name in the same folder (`.NAME.tmp-PID-RANDOM`), flushes
    it to disk (local files: fsync) and renames it; on an object store (s3, gs, azure, ...), where a reader never
    sees a partly uploaded object, it uploads in one shot under the final name. A killed write leaves at worst a
    temporary file, which `is_temporary` recognises and `remove_temporaries` clears.
    `append_line(url, line)` appends one line: in place on local files (append mode), by an atomic rewrite of the
    whole object elsewhere (object stores have no append).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Object stores publish an object only when its upload completes, so a one-shot upload is already atomic.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
_CHUNK = 8 << 20  # write granularity of large payloads
_TMP = re.compile(r"^\..+\.tmp-\d+(-[0-9a-f]+)?$")


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return set(proto) if isinstance(proto, (tuple, list)) else {proto}


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(protocols(fs) & OBJECT_STORES)


def is_temporary(name: str) -> bool:
    """Whether a file name (no folder) is a temporary left by `publish_atomic`."""
    return _TMP.match(name) is not None


def publish_atomic(url: str, data: bytes | memoryview, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Make `data` appear at `url` all at once (see the module docstring); parent folders are created.

    With `fs`, `url` is a path of that file system (as `fsspec.core.url_to_fs` returns it)."""
    if fs is None:
        fs, path = fsspec.core.url_to_fs(url)
    else:
        path = url
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    if is_object_store(fs):
        fs.pipe_file(path, bytes(data))
        return
    tmp = f"{parent}/.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as fh:
            view = memoryview(data)
            for start in range(0, len(view), _CHUNK):
                fh.write(view[start : start + _CHUNK])
            if isinstance(fs, LocalFileSystem):
                # Durable before it gets the real name: a crash of the machine must not leave a renamed empty file.
                fh.flush()
                os.fsync(fh.fileno())
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def append_line(url: str, line: str) -> None:
    """Append `line` (a newline is added) to the text file at `url`, creating it and its folder if needed."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    text = line.rstrip("\n") + "\n"
    if isinstance(fs, LocalFileSystem):
        with fs.open(path, "a") as fh:
            fh.write(text)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    publish_atomic(path, old + text.encode(), fs=fs)


def remove_temporaries(folder_url: str) -> list[str]:
    """Delete the temporaries of killed `publish_atomic` writes directly in `folder_url`; returns their names.
    Call it only when no writer can be running there."""
    fs, path = fsspec.core.url_to_fs(folder_url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    removed = []
    for entry in fs.ls(path, detail=False):
        name = os.path.basename(entry.rstrip("/"))
        if is_temporary(name):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(entry)
            removed.append(name)
    return removed


__all__ = [
    "OBJECT_STORES",
    "append_line",
    "is_object_store",
    "is_temporary",
    "protocols",
    "publish_atomic",
    "remove_temporaries",
]
