"""Reusable layers built on `pipeline.ops`."""

from pipeline.nn.layers import (
    DEFAULT_RESAMPLE_FILTER,
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    normalize_2nd_moment,
)

__all__ = [
    "DEFAULT_RESAMPLE_FILTER",
    "Conv2dLayer",
    "FullyConnectedLayer",
    "MinibatchStdLayer",
    "normalize_2nd_moment",
]
