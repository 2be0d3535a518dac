"""Datasets: WebDataset shards + manifest on any fsspec URL, writing them from image folders, the built-in
synthetic set, the streaming loader that training and evaluation read through, and random access for small data.
"""

from pipeline.data.codec import ImageDecodeError, decode_array, encode_image
from pipeline.data.loader import ShardDataset, decode_image
from pipeline.data.shards import (
    FORMAT_VERSION,
    Manifest,
    ShardInfo,
    ShardWriter,
    read_manifest,
    verify_shards,
    write_manifest,
)
from pipeline.data.stream import (
    BAD_KINDS,
    OnceReader,
    ShardSource,
    SlotReport,
    StreamDataset,
    StreamMonitor,
    StreamOptions,
    StreamState,
    StreamStats,
    build_train_stream,
    open_source,
    read_once,
)
from pipeline.data.synth import (
    KINDS,
    ShapeSpec,
    ensure_synthetic_dataset,
    synthetic_dataset_url,
    synthetic_sample,
    write_synthetic_dataset,
)
from pipeline.data.workers import StreamLoader
from pipeline.errors import DatasetError

__all__ = [
    "BAD_KINDS",
    "FORMAT_VERSION",
    "KINDS",
    "DatasetError",
    "ImageDecodeError",
    "Manifest",
    "OnceReader",
    "ShapeSpec",
    "ShardDataset",
    "ShardInfo",
    "ShardSource",
    "ShardWriter",
    "SlotReport",
    "StreamDataset",
    "StreamLoader",
    "StreamMonitor",
    "StreamOptions",
    "StreamState",
    "StreamStats",
    "build_train_stream",
    "decode_array",
    "decode_image",
    "encode_image",
    "ensure_synthetic_dataset",
    "open_source",
    "read_manifest",
    "read_once",
    "synthetic_dataset_url",
    "synthetic_sample",
    "verify_shards",
    "write_manifest",
    "write_synthetic_dataset",
]
