"""Datasets: WebDataset shards + manifest on any fsspec URL, the built-in synthetic set, and a resumable loader."""

from pipeline.data.loader import InfiniteSampler, ShardDataset, build_train_loader, collate
from pipeline.data.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardInfo,
    ShardWriter,
    read_manifest,
    verify_shards,
    write_manifest,
)
from pipeline.data.synth import (
    KINDS,
    ShapeSpec,
    ensure_synthetic_dataset,
    synthetic_dataset_url,
    synthetic_sample,
    write_synthetic_dataset,
)
from pipeline.errors import DatasetError

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "DatasetError",
    "InfiniteSampler",
    "Manifest",
    "ShapeSpec",
    "ShardDataset",
    "ShardInfo",
    "ShardWriter",
    "build_train_loader",
    "collate",
    "ensure_synthetic_dataset",
    "read_manifest",
    "synthetic_dataset_url",
    "synthetic_sample",
    "verify_shards",
    "write_manifest",
    "write_synthetic_dataset",
]
