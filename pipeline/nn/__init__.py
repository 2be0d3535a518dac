"""Reusable layers built on `pipeline.ops`."""

from pipeline.nn.attention import SelfAttention2d
from pipeline.nn.batchnorm import (
    ConditionalBatchNorm2d,
    CrossReplicaBatchNorm,
    check_truncation,
    convert_batchnorm,
    standing_statistics,
)
from pipeline.nn.layers import (
    DEFAULT_RESAMPLE_FILTER,
    Conv2dLayer,
    FullyConnectedLayer,
    MinibatchStdLayer,
    normalize_2nd_moment,
)
from pipeline.nn.spectral_norm import SNConv2d, SNEmbedding, SNLinear, SpectralNorm

__all__ = [
    "DEFAULT_RESAMPLE_FILTER",
    "ConditionalBatchNorm2d",
    "Conv2dLayer",
    "CrossReplicaBatchNorm",
    "FullyConnectedLayer",
    "MinibatchStdLayer",
    "SNConv2d",
    "SNEmbedding",
    "SNLinear",
    "SelfAttention2d",
    "SpectralNorm",
    "check_truncation",
    "convert_batchnorm",
    "normalize_2nd_moment",
    "standing_statistics",
]
