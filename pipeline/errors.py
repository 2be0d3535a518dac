"""The exception types users see. Each message is one line naming the problem and the fix.

The CLI turns any `GanpipeError` into that one line on stderr and exit code 2, with no traceback.
"""


class GanpipeError(Exception):
    """Base of every user-facing ganpipe error."""


class ConfigError(GanpipeError, ValueError):
    """A recipe or override is invalid."""


class DatasetError(GanpipeError, ValueError):
    """A dataset URL, manifest or shard cannot be used."""


class WorkerError(GanpipeError, RuntimeError):
    """A data loader worker process died mid-stream (killed, out of memory, crashed)."""


class CheckpointError(GanpipeError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class ExportError(GanpipeError, RuntimeError):
    """An exported generator is missing, corrupt, or of an unknown format."""


class SamplingError(GanpipeError, ValueError):
    """A generation request does not fit the generator: malformed seeds, a class for an unconditional model, an
    option its family does not have."""


class LaunchError(GanpipeError, RuntimeError):
    """A job cannot be submitted: no `sbatch`, an unknown profile, Slurm refused the job."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Config validation: raise `ConfigError` naming the key, the value and what is allowed unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")
