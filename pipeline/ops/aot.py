"""Ahead-of-time compilation of the Triton kernels for GPU targets, on any machine (no GPU needed).

Contract
    `variant_space()` lists every binary the launchers of `pipeline.ops._triton_kernels` can ask Triton for, as
    `KernelVariant`s built by the launchers' own `*_variant` functions, one per class of binaries whose resources
    differ: every dtype an op accepts with every tile and warp count the launchers pick (upfirdn2d's three tile
    shapes at each width they shrink to, unrolled and rolled tap loops; bias_act's flat and per-row forms;
    scale_bias_act's column widths; filtered_lrelu's (VB, XB) tile pairs with 1-D or 2-D up and down filters),
    with every code switch on (bias, clamp, noise) and each activation in float32. Constexprs that only change
    index arithmetic (padding, a rank's trip count) take one value per class; unrolled tap counts take the
    largest below the rolling threshold and rolled ones the longest filters the ops make (ADA's 12-tap
    downsampling: 144 per output; filtered_lrelu's backward at up=4: 576).
    `compile_variant(variant, target)` compiles one with `triton.compile` for a `GPUTarget` and reads what the
    binary needs: shared memory (Triton's metadata), registers and stack bytes per thread (the cubin, through the
    `cuobjdump` Triton ships; stack bytes are where spilled registers go). A variant that fails to compile raises
    `KernelCompileError`; `problems(result)` names a binary that would fail at launch (shared memory over the
    target's per-block limit) or spill.
    `compile_space` runs the compilations in fresh worker processes with the interpreter off (`TRITON_INTERPRET`
    is read when a kernel is defined, and interpreted kernels cannot be compiled), so it works under the test
    suite's interpreter too.
    Triton's runtime compiles the same constexprs and warps, but also specializes on arguments (pointers and
    integers divisible by 16, integers equal to 1); those hints lowered registers in every case sampled (e.g.
    198 -> 63), so the registers reported here are an upper bound; shared memory comes from the tiles alone.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from pipeline.ops._ref import ACTIVATIONS
from pipeline.ops._tiles import filtered_lrelu_tiles, kernel_limit

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
FLOAT_SCALARS = ("alpha", "gain", "slope", "clamp")  # every other non-pointer, non-constexpr argument is an i32


@dataclass(frozen=True)
class GpuTarget:
    """A CUDA architecture and its opt-in shared memory per block (CUDA programming guide, compute capabilities)."""

    name: str
    capability: int
    max_shared_bytes: int
    example: str


GPU_TARGETS = {
    "sm_80": GpuTarget("sm_80", 80, 163 * 1024, "A100"),
    "sm_90": GpuTarget("sm_90", 90, 227 * 1024, "H100/H200"),
}


def parse_targets(text: str) -> list[str]:
    """'sm_80,sm_90' -> ['sm_80', 'sm_90']; ValueError naming the unknown ones."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in GPU_TARGETS]
    if unknown or not names:
        raise ValueError(f"--targets {text!r}: choose from {', '.join(GPU_TARGETS)} (comma-separated)")
    return names


class KernelCompileError(RuntimeError):
    """A kernel variant that Triton cannot compile for a target."""


@dataclass(frozen=True)
class CompiledVariant:
    variant: object  # a _triton_kernels.KernelVariant
    target: str
    shared_bytes: int
    registers: int
    stack_bytes: int

    @property
    def dtype(self) -> torch.dtype:
        return dict(self.variant.pointers)["x_ptr"]

    @property
    def hot(self) -> bool:
        """Whether training runs this binary: not the float64 ones (gradient checks)."""
        return self.dtype != torch.float64


def _kernels():
    from pipeline.ops import _triton_kernels  # lazy: importing triton costs seconds

    return _triton_kernels


def variant_space() -> list:
    """Every kernel variant the ops can launch (see the module docstring), without duplicates."""
    k = _kernels()
    space = []
    for dtype in DTYPES:
        # upfirdn2d: StyleGAN2's 4-tap filters for each kind of resampling (taps unrolled), and the rolled
        # form at the longest filters the ops make: ADA's 12-tap lowpass (2-D: 144 taps per output when
        # downsampling) and filtered_lrelu's backward at up=4 with 24 taps (576); each at every tile width.
        for filter_shape, up, down, pad in (
            ((4, 4), (2, 2), (1, 1), (2, 1, 2, 1)),
            ((4, 4), (1, 1), (2, 2), (1, 1, 1, 1)),
            ((4, 4), (1, 1), (1, 1), (1, 2, 1, 2)),
            ((12, 12), (2, 2), (1, 1), (6, 5, 6, 5)),
            ((12, 12), (1, 1), (2, 2), (5, 5, 5, 5)),
            ((24, 24), (1, 1), (4, 4), (11, 11, 11, 11)),
        ):
            for out_w in (16, 32, 64):
                space.append(k.upfirdn2d_variant(dtype, filter_shape, up, down, pad, out_w))
        for grad in (False, True):
            for rows in (False, True):
                space.append(k.bias_act_variant(dtype, "lrelu", True, True, grad, rows))
        for plane in (2**i for i in range(4, 13)):  # every column width BLOCK_C the launcher picks
            space.append(k.scale_bias_act_variant(dtype, "lrelu", True, True, True, plane))
        space += _filtered_lrelu_space(k, dtype)
    for act in ACTIVATIONS:  # every activation's code, in the widest float dtype the models train in
        for grad in (False, True):
            space.append(k.bias_act_variant(torch.float32, act, True, True, grad, True))
        space.append(k.scale_bias_act_variant(torch.float32, act, False, False, False, 4096))
    return list(dict.fromkeys(space))


def _filtered_lrelu_space(k, dtype: torch.dtype) -> list:
    """One variant per (VB, XB) tile pair the kernel takes and per kind of each filter (1-D: rank 1; 2-D: a rank
    loop; the rank's value only sets the loop's trip count)."""
    variants = {}
    for up in range(1, 9):
        for down in range(1, 5):
            for up_taps in (1, 4, 6, 12, 24, 48):
                for down_taps in (1, 4, 6, 12, 24):
                    if kernel_limit(up, down, up_taps, down_taps) is not None:
                        continue
                    _, vb, xb = filtered_lrelu_tiles(up, down, up_taps, down_taps)
                    for ru in {1, min(4, up_taps)}:
                        for rd in {1, min(4, down_taps)}:
                            pad = (up_taps - 1,) * 4
                            variants.setdefault(
                                (vb, xb, ru > 1, rd > 1),
                                k.filtered_lrelu_variant(
                                    dtype, (ru, up_taps, up_taps), (rd, down_taps, down_taps), up, down, pad, True, True
                                ),
                            )
    return list(variants.values())


def _signature(variant) -> tuple[dict[str, str], dict[tuple[int], object]]:
    fn = _kernels().KERNELS[variant.kernel]
    constexprs, pointers = dict(variant.constexprs), dict(variant.pointers)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPES[pointers[name]]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return signature, {(fn.arg_names.index(name),): value for name, value in constexprs.items()}


def cuobjdump() -> str | None:
    """Triton's cuobjdump (`TRITON_CUOBJDUMP_PATH` or the one its wheel ships), None when absent."""
    import triton

    try:
        path = triton.knobs.nvidia.cuobjdump.path
    except (AttributeError, RuntimeError):
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if path and os.path.exists(path) else None


def compile_variant(variant, target: str) -> CompiledVariant:
    """Compile `variant` for `target` (a key of GPU_TARGETS) and measure its binary (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    gpu = GPU_TARGETS[target]
    signature, constexprs = _signature(variant)
    source = ASTSource(_kernels().KERNELS[variant.kernel], signature, constexprs=constexprs)
    try:
        binary = triton.compile(source, target=GPUTarget("cuda", gpu.capability, 32), options=variant.options)
    except Exception as e:
        raise KernelCompileError(f"{describe(variant)} does not compile for {target}: {_error_line(e)}") from e
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(binary.asm["cubin"])
        cubin.flush()
        tool = cuobjdump()
        if tool is None:
            raise KernelCompileError("cuobjdump is missing (Triton ships it; or set TRITON_CUOBJDUMP_PATH)")
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    if found is None:
        raise KernelCompileError(f"cuobjdump gave no resource usage for {describe(variant)}: {usage.stdout[:200]}")
    registers, stack = (int(v) for v in found.groups())
    return CompiledVariant(variant, target, int(binary.metadata.shared), registers, stack)


def _compiler_process() -> None:
    os.environ["TRITON_INTERPRET"] = "0"  # before this process first imports the kernels


def _compile_job(job: tuple[int, str]) -> CompiledVariant | str:
    index, target = job
    try:
        return compile_variant(_space()[index], target)
    except KernelCompileError as e:
        return str(e)
    except Exception as e:  # anything else still names the variant, and the other results survive
        return f"{describe(_space()[index])} on {target}: {type(e).__name__}: {_error_line(e)}"


def _error_line(e: BaseException) -> str:
    """The line of a compiler's message that says what went wrong (ptxas puts it before a repro command)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines)[-1][:300]


@functools.cache
def _space() -> tuple:
    return tuple(variant_space())


def compile_space(
    targets: Iterable[str], workers: int = 1, progress: Callable[[int, int], None] | None = None
) -> tuple[list[CompiledVariant], list[str]]:
    """Compile `variant_space()` for every target in `workers` fresh processes (see the module docstring):
    (results, one line per variant that failed to compile)."""
    jobs = [(index, target) for target in targets for index in range(len(_space()))]
    results: list[CompiledVariant] = []
    failures: list[str] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_compiler_process) as pool:
        for i, out in enumerate(pool.map(_compile_job, jobs)):
            (failures if isinstance(out, str) else results).append(out)
            if progress is not None:
                progress(i + 1, len(jobs))
    return results, failures


def describe(variant) -> str:
    """One line naming a variant: kernel, dtype, the constexprs that shape it, warps."""
    shape = {
        "upfirdn2d": ("UX", "UY", "DX", "DY", "FH", "FW", "BLOCK_H", "BLOCK_W", "ROLLED"),
        "bias_act": ("ACT", "GRAD", "ROWS", "BLOCK"),
        "scale_bias_act": ("ACT", "HAS_NOISE", "BLOCK_R", "BLOCK_C"),
        "filtered_lrelu": ("UP", "DOWN", "LUH", "LDH", "RU", "RD", "VB", "XB"),
    }[variant.kernel]
    values = " ".join(f"{name}={variant[name]}" for name in shape)
    return f"{variant.kernel} {TRITON_TYPES[dict(variant.pointers)['x_ptr']]} {values} warps={variant.num_warps}"


def problems(result: CompiledVariant) -> list[str]:
    """What would make this binary fail at launch (shared memory over the limit) or run slowly (spills)."""
    gpu = GPU_TARGETS[result.target]
    out = []
    if result.shared_bytes > gpu.max_shared_bytes:
        out.append(f"needs {result.shared_bytes} B of shared memory, over {gpu.example}'s {gpu.max_shared_bytes} B")
    if result.stack_bytes and result.hot:
        out.append(f"spills: {result.stack_bytes} B of stack per thread")
    return out


def resource_table(results: Sequence[CompiledVariant], most: int | None = None) -> str:
    """Markdown: per kernel and target, the variants' count and their largest shared memory, registers and stack,
    then (up to `most`) the heaviest variants one per row."""
    lines = [
        "| kernel | target | variants | max shared B (limit) | max registers | max stack B (hot / float64) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[tuple[str, str], list[CompiledVariant]] = {}
    for r in results:
        groups.setdefault((r.variant.kernel, r.target), []).append(r)
    for (kernel, target), rs in groups.items():
        hot = max((r.stack_bytes for r in rs if r.hot), default=0)
        cold = max((r.stack_bytes for r in rs if not r.hot), default=0)
        lines.append(
            f"| {kernel} | {target} | {len(rs)} | {max(r.shared_bytes for r in rs)} "
            f"({GPU_TARGETS[target].max_shared_bytes}) | {max(r.registers for r in rs)} | {hot} / {cold} |"
        )
    if most:
        heavy = sorted(results, key=lambda r: (r.registers, r.shared_bytes), reverse=True)[:most]
        lines += ["", "| variant | target | shared B | registers | stack B |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [
            f"| {describe(r.variant)} | {r.target} | {r.shared_bytes} | {r.registers} | {r.stack_bytes} |"
            for r in heavy
        ]
    return "\n".join(lines)


__all__ = [
    "GPU_TARGETS",
    "CompiledVariant",
    "GpuTarget",
    "KernelCompileError",
    "compile_space",
    "compile_variant",
    "describe",
    "parse_targets",
    "problems",
    "resource_table",
    "variant_space",
]
