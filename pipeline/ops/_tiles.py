"""Launch geometry of the Triton kernels that the ops decide on before any kernel is imported (importing
`_triton_kernels` needs triton and fixes `TRITON_INTERPRET`): filtered_lrelu's tile sizes and which calls its
kernel takes (see `pipeline.ops.filtered_lrelu`)."""

from __future__ import annotations

TILE = 16  # output tile side of one program (tl.dot needs >= 16)
MAX_BLOCK = 64  # the largest V and X tile side the kernel takes


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def filtered_lrelu_tiles(up: int, down: int, up_taps: int, down_taps: int) -> tuple[int, int, int]:
    """(TILE, VB, XB) of the kernel for the longest sides of the up/down filters: VB covers the `rows` upsampled
    rows (columns) one output tile reads, XB the input rows those come from; both powers of two, at least 16.
    (V rows past `rows` meet zero taps of the downsampling band, so X need not cover them.)"""
    rows = (TILE - 1) * down + down_taps
    vb = max(16, _next_power_of_2(rows))
    xb = max(16, _next_power_of_2((rows + up_taps - 2) // up + 2))
    return TILE, vb, xb


def kernel_limit(up: int, down: int, up_taps: int, down_taps: int) -> str | None:
    """Why the kernel does not take this geometry (None: it does): tiles over MAX_BLOCK spill registers and
    outgrow shared memory (`pipeline.ops.aot` measures it)."""
    _, vb, xb = filtered_lrelu_tiles(up, down, up_taps, down_taps)
    if max(vb, xb) <= MAX_BLOCK:
        return None
    return (
        f"the filtered_lrelu kernel takes tiles up to {MAX_BLOCK}x{MAX_BLOCK}; up={up}, down={down} with "
        f"{up_taps}-tap and {down_taps}-tap filters needs {vb}x{xb}"
    )
