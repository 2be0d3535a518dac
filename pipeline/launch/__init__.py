"""Slurm launch: cluster profiles, sbatch rendering and submission (`ganpipe submit`). Requeue itself lives in
`pipeline.train.preemption`, which runs inside the job."""

from pipeline.launch.slurm import (
    Submission,
    SubmitRequest,
    available_profiles,
    find_profile,
    load_profile,
    prepare,
    submit,
)

__all__ = [
    "Submission",
    "SubmitRequest",
    "available_profiles",
    "find_profile",
    "load_profile",
    "prepare",
    "submit",
]
