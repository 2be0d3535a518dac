"""Reusable layers built on `pipeline.ops`."""

from pipeline.nn.batchnorm import CrossReplicaBatchNorm, convert_batchnorm
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
    "CrossReplicaBatchNorm",
    "FullyConnectedLayer",
    "MinibatchStdLayer",
    "convert_batchnorm",
    "normalize_2nd_moment",
]
