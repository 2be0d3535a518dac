"""Image-synthesis ops with NVlabs' public signatures: `upfirdn2d` (+ `setup_filter`, `filter2d`, `upsample2d`,
`downsample2d`), `bias_act`, `conv2d_resample`, `modulated_conv2d`, `filtered_lrelu`.

Every op takes `impl`: 'ref' (pure PyTorch), 'triton' (fused Triton kernels behind `torch.library` custom ops;
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or 'auto' (triton on CUDA, ref elsewhere), and is
differentiable twice either way. `GANPIPE_OPS_IMPL=ref|triton` overrides the argument everywhere; a kernel that
fails at run time falls back to the reference with one `OpsFallbackWarning`.

Importing the package registers the ganpipe:: custom ops (the op modules import `_custom_ops` at the top); it
builds no kernel and imports no triton: `_triton_kernels` is imported on the first impl='triton' call.
"""

from pipeline.ops._dispatch import OpsBackendUnavailable, OpsFallbackWarning, resolve_impl
from pipeline.ops.bias_act import ACTIVATIONS, ActivationSpec, bias_act
from pipeline.ops.conv2d_resample import conv2d_resample
from pipeline.ops.filtered_lrelu import filtered_lrelu
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
    "OpsFallbackWarning",
    "bias_act",
    "conv2d_resample",
    "demodulation_coefficients",
    "downsample2d",
    "filter2d",
    "filtered_lrelu",
    "modulated_conv2d",
    "modulated_weight",
    "prenormalize_fp16",
    "resolve_impl",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]
