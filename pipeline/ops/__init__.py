"""Image-synthesis ops with NVlabs' public signatures: `upfirdn2d` (+ `setup_filter`, `filter2d`, `upsample2d`,
`downsample2d`), `bias_act`, `conv2d_resample`, `modulated_conv2d`.

Every op takes `impl` ('auto', 'ref', or 'triton' for the fused backend, not built yet) and is
differentiable twice. `GANPIPE_OPS_IMPL=ref` forces the pure-PyTorch reference everywhere.
"""

from pipeline.ops._dispatch import OpsBackendUnavailable, resolve_impl
from pipeline.ops.bias_act import ACTIVATIONS, ActivationSpec, bias_act
from pipeline.ops.conv2d_resample import conv2d_resample
from pipeline.ops.modulated_conv2d import (
    demodulation_coefficients,
    modulated_conv2d,
    modulated_weight,
    prenormalize_fp16,
)
from pipeline.ops.upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "OpsBackendUnavailable",
    "bias_act",
    "conv2d_resample",
    "demodulation_coefficients",
    "downsample2d",
    "filter2d",
    "modulated_conv2d",
    "modulated_weight",
    "prenormalize_fp16",
    "resolve_impl",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]
