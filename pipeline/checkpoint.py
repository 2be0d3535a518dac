"""Training checkpoints on any fsspec URL: atomic, verified writes, keep-last-k, newest-valid lookup for resume.

A storage primitive below `pipeline.train`: training writes checkpoints, and export, metrics and `init=` read them
without importing the engine.

A checkpoint is a dict of tensors and builtins only (it loads with `torch.load(weights_only=True)`): the networks,
every optimizer, the objective's state, counters, RNG states, data position and the resolved config.

Contract of a checkpoint folder (`RUN_DIR/checkpoints/`):
    `ckpt-NNNNNNNNNNNN.pt`       the checkpoint after NNN images (names sort in training order)
    `ckpt-NNNNNNNNNNNN.pt.json`  its record: `size` (bytes) and `sha256` of the file, `cur_nimg`, `time`
    Both are published by `pipeline.storage.publish_atomic` (a hidden temporary name and a rename on file
    systems, one-shot uploads on object stores). The record is published *before* the checkpoint, so every
    checkpoint under its real name has its record. After writing, the checkpoint is read back and checked against
    the record; a mismatch is retried once, then raised.

    So a kill at any moment leaves, at worst, a stale temporary file (removed by `clean_stale_temporaries`) or a
    record without its checkpoint (ignored). On resume (`find_latest_checkpoint`), each candidate is checked
    against its record before it is loaded; a corrupt or truncated newest checkpoint is reported and the previous
    one is used. A checkpoint without a record (written by an older ganpipe) is loaded unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from pipeline.errors import CheckpointError
from pipeline.storage import publish_atomic, remove_temporaries, sha256_of

log = logging.getLogger(__name__)

FORMAT = "ganpipe-checkpoint"
VERSION = 1
RECORD_SUFFIX = ".json"
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def checkpoint_name(cur_nimg: int) -> str:
    """File name for a checkpoint taken after `cur_nimg` images; names sort in training order."""
    return f"ckpt-{cur_nimg:012d}.pt"


def checkpoint_dir(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints"


@dataclass(frozen=True)
class CheckpointRecord:
    """What is recorded beside a checkpoint (`NAME.json`) to verify it before it is used."""

    size: int
    sha256: str
    cur_nimg: int | None = None
    time: float | None = None

    def to_json(self) -> str:
        return json.dumps({"size": self.size, "sha256": self.sha256, "cur_nimg": self.cur_nimg, "time": self.time})

    @classmethod
    def from_json(cls, text: str) -> CheckpointRecord:
        data = json.loads(text)
        return cls(int(data["size"]), str(data["sha256"]), data.get("cur_nimg"), data.get("time"))


def save_checkpoint(state: dict[str, Any], url: str) -> CheckpointRecord:
    """Atomically write `state` to `url` with its record beside it, then verify what was written.

    Raises CheckpointError when the file read back does not match (after one retry).
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    data = buffer.getbuffer()
    cur_nimg = state.get("counters", {}).get("cur_nimg")
    record = CheckpointRecord(len(data), hashlib.sha256(data).hexdigest(), cur_nimg, time.time())
    fs, path = fsspec.core.url_to_fs(url)
    publish_atomic(path + RECORD_SUFFIX, record.to_json().encode(), fs=fs)
    for attempt in (1, 2):
        publish_atomic(path, data, fs=fs)
        fs.invalidate_cache(fs._parent(path))
        written = sha256_of(fs, path)
        if written == (record.size, record.sha256):
            return record
        log.warning(
            "checkpoint %s read back as %d bytes sha256 %s, expected %d bytes %s (attempt %d)",
            url, written[0], written[1][:12], record.size, record.sha256[:12], attempt,
        )  # fmt: skip
    raise CheckpointError(
        f"checkpoint {url!r} does not read back as written (size/sha256 mismatch twice): check the storage"
    )


def read_record(url: str) -> CheckpointRecord | None:
    """The record beside checkpoint `url`, or None when it has none (older ganpipe) or it is unreadable."""
    fs, path = fsspec.core.url_to_fs(url + RECORD_SUFFIX)
    try:
        return CheckpointRecord.from_json(fs.cat_file(path).decode())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint record {url + RECORD_SUFFIX!r} is unreadable ({e})") from None


def load_checkpoint(url: str, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint without executing code from it; CheckpointError if missing, corrupt or foreign.

    With `verify`, the bytes must match the size and sha256 recorded beside the file (when there is a record).
    """
    try:
        with fsspec.open(url, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url!r} does not exist: pass a checkpoint file or a run dir") from None
    if verify:
        record = read_record(url)
        if record is not None:
            if len(raw) != record.size:
                raise CheckpointError(
                    f"checkpoint {url!r} is truncated or corrupt: {len(raw)} bytes, its record says {record.size}"
                )
            if hashlib.sha256(raw).hexdigest() != record.sha256:
                raise CheckpointError(f"checkpoint {url!r} is corrupt: its sha256 differs from the recorded one")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notices about a foreign file's pickle: the error below says it
            state = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        # Not torch's message: it advises weights_only=False, which would run code from the file.
        raise CheckpointError(
            f"{url!r} is not a ganpipe checkpoint ({type(e).__name__}: it holds something other than tensors and "
            "plain data, or is cut short): pass a file from RUN_DIR/checkpoints/, or a run dir"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{url!r} is not a ganpipe checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {url!r} has format version {state['version']}; upgrade ganpipe to read it")
    return state


def _names(run_dir: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    fs.invalidate_cache(path)  # another process (rank 0, an earlier job) may have written since we last looked
    if not fs.exists(path):
        return fs, path, []
    return fs, path, sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def list_checkpoints(run_dir: str) -> list[str]:
    """URLs of the run's checkpoints, oldest first."""
    _, _, names = _names(run_dir)
    base = checkpoint_dir(run_dir)
    return [f"{base}/{n}" for n in names if _NAME.match(n)]


def find_latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that verifies and loads, with its state; corrupt newer ones are reported and skipped."""
    rejected: list[str] = []
    for url in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(url)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            rejected.append(url)
            continue
        if rejected:
            log.warning(
                "newest checkpoint(s) %s unusable: resuming from the previous one, %s",
                ", ".join(os.path.basename(u) for u in rejected), url,
            )  # fmt: skip
        return url, state
    return None


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (with their records) and records left without one."""
    fs, path, names = _names(run_dir)
    ckpts = [n for n in names if _NAME.match(n)]
    doomed = ckpts[: max(len(ckpts) - keep_last, 0)]
    for name in doomed:
        # The checkpoint first: a record without its checkpoint is ignored, a checkpoint without record is not.
        fs.rm(f"{path}/{name}")
        with contextlib.suppress(FileNotFoundError):
            fs.rm(f"{path}/{name}{RECORD_SUFFIX}")
    kept = set(ckpts) - set(doomed)
    newest = ckpts[-1] if ckpts else ""
    for name in names:
        if name.endswith(RECORD_SUFFIX) and _NAME.match(name[: -len(RECORD_SUFFIX)]):
            ckpt = name[: -len(RECORD_SUFFIX)]
            # A record newer than every checkpoint belongs to a write that was killed (or is about to happen).
            if ckpt not in kept and ckpt not in doomed and ckpt < newest:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(f"{path}/{name}")


def clean_stale_temporaries(run_dir: str) -> list[str]:
    """Remove temporary files of checkpoint writes that were killed. Call only when no writer is running."""
    removed = remove_temporaries(checkpoint_dir(run_dir))
    if removed:
        log.info("removed %d temporary file(s) of interrupted checkpoint writes in %s", len(removed), run_dir)
    return removed


def resolve_checkpoint(source: str) -> str:
    """A checkpoint file URL, or a run dir (its newest valid checkpoint)."""
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path):
        found = find_latest_checkpoint(source)
        if found is None:
            raise CheckpointError(f"run dir {source!r} has no readable checkpoint under checkpoints/")
        return found[0]
    if not fs.exists(path):
        raise CheckpointError(f"{source!r} does not exist: pass a checkpoint file or a run dir")
    return source


__all__ = [
    "FORMAT",
    "RECORD_SUFFIX",
    "VERSION",
    "CheckpointRecord",
    "checkpoint_dir",
    "checkpoint_name",
    "clean_stale_temporaries",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_record",
    "resolve_checkpoint",
    "save_checkpoint",
]
