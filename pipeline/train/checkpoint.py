"""Training checkpoints on any fsspec URL: atomic writes, keep-last-k, newest-valid lookup for resume.

A checkpoint is a dict of tensors and builtins only (it loads with `torch.load(weights_only=True)`): the networks,
both optimizers, the objective's state, counters, RNG states, data position and the resolved config. It is
written under a temporary name and renamed, so a kill mid-write never leaves a half file under a real name.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any

import fsspec
import torch

from pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "ganpipe-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def checkpoint_name(cur_nimg: int) -> str:
    """File name for a checkpoint taken after `cur_nimg` images; names sort in training order."""
    return f"ckpt-{cur_nimg:012d}.pt"


def checkpoint_dir(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/checkpoints"


def save_checkpoint(state: dict[str, Any], url: str) -> None:
    """Atomically write `state` to `url` (temporary name in the same folder, then rename)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
    fs, path = fsspec.core.url_to_fs(url)
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{os.path.basename(path)}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as fh:
        fh.write(buffer.getbuffer())
    fs.mv(tmp, path)


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it; CheckpointError if missing, corrupt or foreign."""
    try:
        with fsspec.open(url, "rb") as fh:
            state = torch.load(io.BytesIO(fh.read()), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url!r} does not exist: pass a checkpoint file or a run dir") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {url!r} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{url!r} is not a ganpipe checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint {url!r} has format version {state['version']}; upgrade ganpipe to read it")
    return state


def list_checkpoints(run_dir: str) -> list[str]:
    """URLs of the run's checkpoints, oldest first."""
    fs, path = fsspec.core.url_to_fs(checkpoint_dir(run_dir))
    if not fs.exists(path):
        return []
    names = sorted(n for n in (os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)) if _NAME.match(n))
    base = checkpoint_dir(run_dir)
    return [f"{base}/{n}" for n in names]


def find_latest_checkpoint(run_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint that loads, with its state; corrupt newer ones are reported and skipped."""
    for url in reversed(list_checkpoints(run_dir)):
        try:
            return url, load_checkpoint(url)
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint: %s", e)
    return None


def prune_checkpoints(run_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    urls = list_checkpoints(run_dir)
    for url in urls[: max(len(urls) - keep_last, 0)]:
        fs, path = fsspec.core.url_to_fs(url)
        fs.rm(path)


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
