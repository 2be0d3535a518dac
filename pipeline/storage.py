"""Files on any fsspec URL that appear whole or not at all: the one writer for checkpoints, exports, manifests,
metric caches and logs that are rewritten.

Contract
    `publish_atomic(url, data)` makes `data` appear at `url` at once. On a file system with rename (local disk,
    NFS, Lustre, memory://) it writes a hidden temporary name in the same folder (`.NAME.tmp-PID-RANDOM`), flushes
    it to disk (local files: fsync) and renames it; on an object store (s3, gs, azure, ...), where a reader never
    sees a partly uploaded object, it uploads in one shot under the final name. A killed write leaves at worst a
    temporary file, which `is_temporary` recognises and `remove_temporaries` clears.
    `append_text(url, text)` / `append_line(url, line)` append: in place on local files (append mode), by an
    atomic rewrite of the whole object elsewhere (object stores have no append).
    `user_url(role, url)` turns what fsspec, botocore, gcsfs or aiohttp raise about a URL the user gave into one
    `StorageError` line naming the URL, its role (data.url, run_dir, ...), the cause (no credentials, no such
    bucket, credentials rejected, permission denied, endpoint unreachable) and the fix; `storage_failure(exc)`
    names the cause of any exception, or None when it is not a storage failure.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import GanpipeError

# Object stores publish an object only when its upload completes, so a one-shot upload is already atomic.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
_CHUNK = 8 << 20  # write granularity of large payloads
_TMP = re.compile(r"^\..+\.tmp-\d+(-[0-9a-f]+)?$")


class StorageError(GanpipeError):
    """A URL the user gave cannot be read or written: no credentials, no such bucket, rejected, unreachable."""


# Cause -> what to do about it. The causes are recognised by the exception types of the storage libraries (by name:
# botocore, gcsfs and aiohttp need not be installed) and the messages their services send.
_FIXES = {
    "no credentials": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for s3://, "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://",
    "no such bucket": "create the bucket or fix the URL",
    "the credentials were rejected": "check the access key and secret (and AWS_ENDPOINT_URL)",
    # An object store's 403 to a HEAD request has no body: rejected credentials and missing rights look the same.
    "permission denied": "check the credentials (and AWS_ENDPOINT_URL), grant access to that location, or choose "
    "another one",
    "the endpoint cannot be reached": "check the network, the host name and AWS_ENDPOINT_URL",
    "a file is in the way": "a part of the path is a file, not a folder: move it or choose another location",
    "the file system is read-only": "choose a writable location",
    "no space left on the device": "free space or choose another location",
}
_LOCAL_CAUSES = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOTDIR: "a file is in the way",
    errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "no space left on the device",
}  # fmt: skip
_CREDENTIALS = {
    "NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "CredentialRetrievalError",
}  # fmt: skip
_UNREACHABLE = {
    "EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError", "ConnectionRefusedError", "gaierror",
    "ServerTimeoutError", "ReadTimeoutError", "ConnectTimeout", "ProxyConnectionError",
}  # fmt: skip
# Where a storage failure comes from: an exception of one of these packages in the chain (a PermissionError of
# wandb, a DNS error of a model download or a timeout of a tokenizer are not the storage's).
_STORAGE_PACKAGES = {"botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "azure", "fsspec", "aiohttp"}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its cause and its context, as Python would print them."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return chain


def _local_path(url: str) -> str | None:
    """The absolute path of a local URL (a plain path or file://), None for any other protocol."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url or "::" in url:
        return None
    return os.path.abspath(url)


def _about(e: BaseException, path: str) -> bool:
    """Whether `e` is an OSError about `path`, a file below it or a folder above it (creating it failed)."""
    name = getattr(e, "filename", None)
    if not isinstance(e, OSError) or not isinstance(name, str):
        return False
    name = os.path.abspath(name)
    return name == path or name.startswith(path.rstrip("/") + "/") or path.startswith(name.rstrip("/") + "/")


def storage_failure(exc: BaseException, url: str | None = None) -> str | None:
    """Why storage failed (one of `_FIXES`' causes), from an exception and its chain; None for anything else.

    Only failures of a storage library count, and with a local `url` also an OSError about that path (permission
    denied, a file in the way, read-only, full)."""
    chain = _chain(exc)
    local = _local_path(url) if url is not None else None
    if local is not None:
        for e in chain:
            if _about(e, local) and getattr(e, "errno", None) in _LOCAL_CAUSES:
                return _LOCAL_CAUSES[e.errno]  # type: ignore[attr-defined]
    if not any(type(e).__module__.split(".")[0] in _STORAGE_PACKAGES for e in chain):
        return None
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if names & _CREDENTIALS or "Unable to locate credentials" in text:
        return "no credentials"
    if "NoSuchBucket" in names or "NoSuchBucket" in text or "bucket does not exist" in text:
        return "no such bucket"
    if any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")):
        return "the credentials were rejected"
    if "PermissionError" in names or "AccessDenied" in text or "Forbidden" in text:
        return "permission denied"
    if names & _UNREACHABLE:
        return "the endpoint cannot be reached"
    return None


def describe_failure(cause: str) -> str:
    """A cause of `storage_failure` and its fix, as one phrase."""
    return f"{cause}: {_FIXES[cause]}"


@contextlib.contextmanager
def user_url(role: str, url: str) -> Iterator[None]:
    """Storage failures about `url` (a `role` such as data.url or run_dir) as one `StorageError` line."""
    try:
        yield
    except GanpipeError:
        raise
    except Exception as e:
        cause = storage_failure(e, url)
        if cause is None:
            raise
        raise StorageError(f"{role} {url!r}: {describe_failure(cause)}") from None


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def canonical_url(url: str) -> str:
    """One spelling per location: a relative and an absolute path to one folder give the same URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.unstrip_protocol(os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path.rstrip("/"))


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


def append_text(url: str, text: str) -> None:
    """Append `text` to the text file at `url`, creating it and its folder if needed."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        with fs.open(path, "a") as fh:
            fh.write(text)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    publish_atomic(path, old + text.encode(), fs=fs)


def append_line(url: str, line: str) -> None:
    """Append `line` (a newline is added) to the text file at `url`."""
    append_text(url, line.rstrip("\n") + "\n")


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
    "StorageError",
    "append_line",
    "append_text",
    "canonical_url",
    "describe_failure",
    "is_object_store",
    "is_temporary",
    "protocols",
    "publish_atomic",
    "remove_temporaries",
    "sha256_of",
    "storage_failure",
    "user_url",
]
