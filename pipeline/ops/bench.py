"""Reference vs Triton for every op on StyleGAN2's shapes: what `tools/bench_ops.py` and `ganpipe bench ops` run.

On a CUDA device, for each case it times the forward and the forward + backward with `impl='ref'` and with
`impl='triton'` (`triton.testing.do_bench`: median over repeats, L2 flushed between runs), reports the achieved
GB/s of the forward for the memory-bound ops (bytes that must move at least once, read + written, over time) and
its fraction of the device-to-device copy bandwidth measured in the same run, and the speed-up ref/triton.
Without CUDA it says so and runs a correctness-only pass: the same cases at small sizes under Triton's CPU
interpreter, triton against ref, forward and gradients.

Both passes check what they measure with the same function (`check_closures`): the closures that were just timed
(on the CPU: built for the check) run forward + backward once more, triton against ref, within `Tolerance` (per
dtype, see `default_tolerance`), and a Triton kernel that fails counts as a failure instead of silently falling
back to the reference (which would time and check the reference against itself). Any failed case prints a
`FAIL <op> <shape> <dtype>: ...` line with the max abs difference, and the run ends with `BenchCheckFailed`, a
`SystemExit` with a non-zero status, after the table: `tools/bench_ops.py` and `ganpipe bench ops` exit 1.

Cases (batch 32, channels from StyleGAN2 config F: min(32768 / res, 512), at least 64):
    upfirdn2d up2 / down2   4-tap [1, 3, 3, 1] filter, 2x upsampling res/2 -> res and 2x downsampling res -> res/2
    bias_act                lrelu, per-channel bias, gain sqrt(2), clamp 256 (a conv layer's epilogue)
    modconv epilogue        clamp(lrelu(y * d[n, c] + noise + b[c]) * gain): the non-fused modulated
                            convolution's output stage, `ganpipe::scale_bias_act` vs the reference's torch ops
    filtered_lrelu          StyleGAN3's 2x up, 12-tap, lrelu, 2x down (the composed fused ops)
    synthesis               a whole synthesis network forward + backward (when the caller supplies one)
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from pipeline.ops import aot, bias_act, downsample2d, filtered_lrelu, setup_filter, upsample2d
from pipeline.ops._custom_ops import scale_bias_act_op
from pipeline.ops._dispatch import OpsFallbackWarning, triton_unavailable_reason

Tensor = torch.Tensor

STYLEGAN2_RESOLUTIONS = (8, 16, 32, 64, 128, 256, 1024)
IMPLS = ("ref", "triton")
CHECK_SEED = 0  # the RNG seed before each checked call, so that cases drawing noise draw the same in both


def config_f_channels(resolution: int) -> int:
    return max(64, min(32768 // resolution, 512))


# ------------------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Tolerance:
    """When triton's results count as equal to the reference's.

    forward: max|triton - ref| <= forward * max|ref| over the forward output (continuous in its inputs, so the two
        backends differ by a few roundings of the dtype everywhere).
    grads: ||triton - ref||_2 <= grads * ||ref||_2 for the gradient of every input (a norm, not a max: where a
        pre-activation is rounded to the other side of the lrelu kink by one backend and not by the other, the
        derivative differs by (1 - slope) * gain at that element, legitimately; in bf16 that is about one element
        in a thousand of the modulated convolution's epilogue, whose gradient then differs by up to 70% of its
        max there).
    grads_together: compare the gradients of all inputs as one vector instead of each input's on its own; for
        whole networks, where the gradient of a scalar parameter (a noise strength) is a sum over every pixel
        that nearly cancels, ill-conditioned on its own in bf16.
    """

    forward: float
    grads: float
    grads_together: bool = False

    def __str__(self) -> str:
        scope = "all gradients as one vector" if self.grads_together else "each input's gradient"
        grads = f"{scope} ||diff||_2 <= {self.grads:.0e} * ||ref||_2"
        return f"forward max abs diff <= {self.forward:.0e} * max|ref|, {grads}"


# Per-op cases. The Triton kernels compute in float32 (float64 for float64) and round once; the reference rounds
# after each torch op: bf16 (2^-8 = 3.9e-3 relative per rounding) measured up to 8.7e-3 forward and 2.3e-2
# gradients (filtered_lrelu, modconv epilogue), fp16 1.7e-3 and 5.3e-3; a broken kernel is off by O(1).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-9, 1e-9),
    torch.float32: Tolerance(1e-4, 1e-4),
    torch.bfloat16: Tolerance(3e-2, 1e-1),
    torch.float16: Tolerance(1e-2, 3e-2),
}
# On CUDA the reference's convolutions run on cuDNN, which uses TF32 for float32 by default
# (torch.backends.cudnn.conv.fp32_precision == 'tf32': a 10-bit mantissa, 4.9e-4 relative per operand).
TOLERANCE_CUDA_FP32 = Tolerance(2e-3, 2e-3)
# Whole networks (`network_case`): rounding differences compound over the layers (a bf16 synthesis network
# measured 2.7e-2 forward and 2.3e-2 for all gradients together, at 8-32px).
NETWORK_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-8, 1e-8, grads_together=True),
    torch.float32: Tolerance(1e-2, 1e-2, grads_together=True),
    torch.bfloat16: Tolerance(1e-1, 1e-1, grads_together=True),
    torch.float16: Tolerance(5e-2, 5e-2, grads_together=True),
}


def default_tolerance(dtype: torch.dtype, device_type: str) -> Tolerance:
    """The tolerance of a per-op case without its own."""
    if dtype == torch.float32 and device_type == "cuda":
        return TOLERANCE_CUDA_FP32
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class Case:
    """One benchmark case: `make(impl)` returns a zero-argument forward closure and the tensors that require
    grad; `bytes_moved` is the forward's minimum memory traffic (None for compute-bound cases); `tolerance`
    None means `default_tolerance` of the case's dtype on the device it runs on (`network_case` sets one)."""

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[str], tuple[Callable[[], Tensor], list[Tensor]]]
    bytes_moved: int | None
    tolerance: Tolerance | None = None

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape} {_dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Diff:
    """triton against ref for one result of a case: the forward output, the gradient of one input, or the
    gradients of all inputs taken together (`Tolerance.grads_together`)."""

    what: str
    max_abs: float  # max |triton - ref|
    ref_max: float  # max |ref|
    rel_l2: float  # ||triton - ref||_2 / ||ref||_2
    error: float  # what is held against `limit`: max_abs / ref_max for the forward, rel_l2 for a gradient
    limit: float
    mismatch: str | None = None  # the shapes or dtypes differ

    @property
    def ok(self) -> bool:
        return self.mismatch is None and self.error <= self.limit  # False for NaN

    def describe(self) -> str:
        if self.mismatch is not None:
            return f"{self.what}: {self.mismatch}"
        measure = "max abs diff / max|ref|" if self.what == "forward" else "||diff||_2 / ||ref||_2"
        return (
            f"{self.what}: max abs diff {self.max_abs:.3e} (max|ref| {self.ref_max:.3e}); "
            f"{measure} = {self.error:.3e} {'<=' if self.ok else 'exceeds'} tolerance {self.limit:.0e}"
        )


@dataclass(frozen=True)
class Check:
    """The outcome of checking one case: a Diff per result, or the error that stopped it (a kernel that failed,
    which with the fallback made an error here shows as `OpsFallbackWarning`, or any other exception)."""

    case: Case
    diffs: tuple[Diff, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.diffs) and all(d.ok for d in self.diffs)

    @property
    def forward(self) -> Diff | None:
        return self.diffs[0] if self.diffs else None

    @property
    def worst_grad(self) -> Diff | None:
        grads = self.diffs[1:]
        return max(grads, key=lambda d: (not d.ok, math.inf if math.isnan(d.error) else d.error)) if grads else None

    def failure_lines(self) -> list[str]:
        if self.error is not None:
            return [f"FAIL {self.case.label}: {self.error}"]
        return [f"FAIL {self.case.label}: triton differs from ref, {d.describe()}" for d in self.diffs if not d.ok]


class BenchCheckFailed(SystemExit):
    """Raised (after the table and the FAIL lines are printed) when any case's triton results differ from the
    reference or its kernel failed. A SystemExit whose code is the message: the process exits with status 1 and the
    message on stderr (`pipeline.cli.main` returns 1 after printing it), whoever called the benchmark."""

    def __init__(self, failed: Sequence[Check], total: int, compile_failures: Sequence[str] = ()):
        self.checks = tuple(failed)
        if compile_failures:
            message = (f"bench ops: {len(compile_failures)} of {total} kernel variant(s) cannot run on their target, "
                       f"e.g. {compile_failures[0]}")  # fmt: skip
        else:
            names = ", ".join(c.case.label for c in failed)
            message = f"bench ops: {len(failed)} of {total} case(s) failed the triton-vs-ref check: {names}"
        super().__init__(message)


def forward_backward(fn: Callable[[], Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """What the forward + backward timing runs and what the check compares: the forward output and the gradient
    of its sum with respect to every input."""
    y = fn()
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    return [y.detach(), *grads]


_CHUNK = 1 << 24  # elements per step of the comparison: a few temporaries of this size, not of the whole tensor


def _diff(what: str, triton: Sequence[Tensor], ref: Sequence[Tensor], limit: float, forward: bool) -> Diff:
    """triton against ref over tensors taken together (one for the forward or an input's gradient)."""
    for t, r in zip(triton, ref, strict=True):
        if t.shape != r.shape or t.dtype != r.dtype:
            mismatch = f"triton gave {list(t.shape)} {t.dtype}, ref {list(r.shape)} {r.dtype}"
            return Diff(what, math.inf, math.nan, math.inf, math.inf, limit, mismatch)
    max_abs = ref_max = diff_sq = ref_sq = 0.0
    for t, r in zip(triton, ref, strict=True):
        acc = torch.float64 if r.dtype == torch.float64 else torch.float32
        for tc, rc in zip(t.detach().flatten().split(_CHUNK), r.detach().flatten().split(_CHUNK), strict=True):
            rc = rc.to(acc)  # may be the caller's tensor itself (a view): nothing below writes to it
            d = (tc.to(acc) - rc).abs_()
            m = float(d.max())
            max_abs = m if math.isnan(m) or m > max_abs else max_abs  # a NaN anywhere stays (and fails the check)
            ref_max = max(ref_max, float(torch.linalg.vector_norm(rc, math.inf)))
            diff_sq += float(torch.linalg.vector_norm(d)) ** 2
            ref_sq += float(torch.linalg.vector_norm(rc)) ** 2
    rel_l2 = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-12)
    error = max_abs / max(ref_max, 1e-12) if forward else rel_l2
    return Diff(what, max_abs, ref_max, rel_l2, error, limit)


def compare(ref: Sequence[Tensor], triton: Sequence[Tensor], tolerance: Tolerance) -> tuple[Diff, ...]:
    """Diffs of `forward_backward`'s results: the forward output first, then the inputs' gradients (each, or all
    together as the tolerance says)."""
    if len(ref) != len(triton):
        raise ValueError(f"ref returned {len(ref)} results, triton {len(triton)}")
    diffs = [_diff("forward", triton[:1], ref[:1], tolerance.forward, forward=True)]
    if tolerance.grads_together and len(ref) > 1:
        what = f"gradients of all {len(ref) - 1} inputs together"
        diffs.append(_diff(what, triton[1:], ref[1:], tolerance.grads, forward=False))
    else:
        for i, (t, r) in enumerate(zip(triton[1:], ref[1:], strict=True)):
            diffs.append(_diff(f"gradient of input {i} {list(r.shape)}", [t], [r], tolerance.grads, forward=False))
    return tuple(diffs)


@contextlib.contextmanager
def fallback_raises() -> Iterator[None]:
    """Inside, a Triton kernel that fails raises `OpsFallbackWarning` instead of falling back to the reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpsFallbackWarning)
        yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch.manual_seed(seed) inside, the caller's RNG states (CPU and the current CUDA device) restored after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_closures(
    case: Case, closures: dict[str, tuple[Callable[[], Tensor], list[Tensor]]] | None = None
) -> Check:  # fmt: skip
    """Run `forward_backward` of the ref and the triton closure (the given ones, e.g. those just timed, or fresh
    ones from `case.make`) with the same RNG seed and compare them within the case's tolerance. A kernel failure
    or any other exception becomes the Check's `error`; this never raises."""
    try:
        with fallback_raises():
            if closures is None:
                closures = {impl: case.make(impl) for impl in IMPLS}
            results = {}
            for impl in IMPLS:
                fn, inputs = closures[impl]
                with _seeded(CHECK_SEED):
                    results[impl] = forward_backward(fn, inputs)
        device_type = results["ref"][0].device.type
        tolerance = case.tolerance or default_tolerance(case.dtype, device_type)
        return Check(case, compare(results["ref"], results["triton"], tolerance))
    except Exception as err:  # reported as this case's failure; the other cases still run
        return Check(case, error=_one_line(err))


def check_case(case: Case) -> Check:
    """The correctness check of one case on fresh closures (the CPU pass; the timing pass checks its own)."""
    return check_closures(case)


def _verdict(checks: Sequence[Check], print_fn: Callable[[str], None]) -> int:
    """0 when every check passed; otherwise print the FAIL lines and raise `BenchCheckFailed`."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return 0
    print_fn("")
    for check in failed:
        for line in check.failure_lines():
            print_fn(line)
    raise BenchCheckFailed(failed, len(checks))


def _tolerance_line(device_type: str, dtypes: Sequence[torch.dtype]) -> str:
    parts = [f"{_dtype_name(d)}: {default_tolerance(d, device_type)}" for d in dict.fromkeys(dtypes)]
    return "check (triton vs ref, forward and every input gradient): " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------------- cases


@dataclass
class Row:
    case: Case
    fwd_ref_ms: float
    fwd_triton_ms: float
    bwd_ref_ms: float
    bwd_triton_ms: float
    check: Check | None = field(default=None)

    def gbps(self, ms: float) -> float | None:
        return None if self.case.bytes_moved is None else self.case.bytes_moved / (ms * 1e-3) / 1e9


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def _randn(shape: Sequence[int], dtype: torch.dtype, device: str, grad: bool = True) -> Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _upfirdn2d_case(n: int, c: int, in_res: int, dtype: torch.dtype, device: str, mode: str) -> Case:
    """mode 'up2': [n, c, in_res, in_res] -> 2 in_res; 'down2': -> in_res / 2 (4-tap filter, padding as NVIDIA's)."""
    f = setup_filter([1, 3, 3, 1], device=torch.device(device))
    x = _randn((n, c, in_res, in_res), dtype, device)
    fn = upsample2d if mode == "up2" else downsample2d
    out_res = in_res * 2 if mode == "up2" else in_res // 2
    bytes_moved = (in_res * in_res + out_res * out_res) * n * c * x.element_size()

    def make(impl: str):
        return (lambda: fn(x, f, impl=impl)), [x]

    return Case(f"upfirdn2d {mode}", f"[{n},{c},{in_res},{in_res}]", dtype, make, bytes_moved)


def _bias_act_case(n: int, c: int, res: int, dtype: torch.dtype, device: str) -> Case:
    x = _randn((n, c, res, res), dtype, device)
    b = _randn((c,), dtype, device)

    def make(impl: str):
        return (lambda: bias_act(x, b, act="lrelu", gain=math.sqrt(2), clamp=256.0, impl=impl)), [x, b]

    return Case("bias_act", f"[{n},{c},{res},{res}]", dtype, make, 2 * x.numel() * x.element_size())


def _epilogue_case(n: int, c: int, res: int, dtype: torch.dtype, device: str) -> Case:
    y = _randn((n, c, res, res), dtype, device)
    d = _randn((n, c), torch.float32, device).abs().detach().requires_grad_()
    noise = _randn((n, 1, res, res), dtype, device)
    b = _randn((c,), torch.float32, device)

    def make(impl: str):
        if impl == "triton":
            return (lambda: scale_bias_act_op(y, d.to(dtype), noise, b.to(dtype), "lrelu", 0.2, math.sqrt(2), 256.0)), [
                y, d, noise, b]  # fmt: skip

        def ref() -> Tensor:
            z = y * d.to(dtype).reshape(n, c, 1, 1) + noise
            return bias_act(z, b.to(dtype), act="lrelu", gain=math.sqrt(2), clamp=256.0, impl="ref")

        return ref, [y, d, noise, b]

    moved = (2 * y.numel() + noise.numel()) * y.element_size()
    return Case("modconv epilogue", f"[{n},{c},{res},{res}]", dtype, make, moved)


def _filtered_lrelu_case(n: int, c: int, res: int, dtype: torch.dtype, device: str) -> Case:
    taps = torch.kaiser_window(12, periodic=False, beta=8.0) * torch.sinc((torch.arange(12) - 5.5) / 2) / 2
    fu = setup_filter(taps, device=torch.device(device), gain=1, separable=True)
    fd = setup_filter(taps, device=torch.device(device), gain=1, separable=True)
    x = _randn((n, c, res, res), dtype, device)
    b = _randn((c,), dtype, device)

    def make(impl: str):
        return (lambda: filtered_lrelu(x, fu, fd, b, up=2, down=2, padding=10, clamp=256.0, impl=impl)), [x, b]

    return Case("filtered_lrelu", f"[{n},{c},{res},{res}]", dtype, make, 2 * x.numel() * x.element_size())


def stylegan2_cases(batch: int, resolutions: Sequence[int], dtypes: Sequence[torch.dtype], device: str) -> list[Case]:
    cases = []
    for dtype in dtypes:
        for res in resolutions:
            c = config_f_channels(res)
            cases.append(_upfirdn2d_case(batch, c, res // 2, dtype, device, "up2"))  # the block's upsampling
            cases.append(_upfirdn2d_case(batch, c, res, dtype, device, "down2"))  # D's downsampling
            cases.append(_bias_act_case(batch, c, res, dtype, device))
            cases.append(_epilogue_case(batch, c, res, dtype, device))
    return cases


def target_cases(device: str) -> list[Case]:
    """The issue's named targets: 2x up / 2x down of bf16 [32, 256, 128, 128] with a 4-tap filter, and bias_act."""
    bf16 = torch.bfloat16
    return [
        _upfirdn2d_case(32, 256, 128, bf16, device, "up2"),
        _upfirdn2d_case(32, 256, 128, bf16, device, "down2"),
        _bias_act_case(32, 256, 128, bf16, device),
        _epilogue_case(32, 256, 128, bf16, device),
        _filtered_lrelu_case(32, 256, 64, bf16, device),
    ]


def network_case(case: Case) -> Case:
    """A whole-network case (the synthesis network a caller supplies): unless it brings its own tolerance, the
    looser `NETWORK_TOLERANCES` of its dtype, all parameter gradients compared together."""
    return case if case.tolerance is not None else replace(case, tolerance=NETWORK_TOLERANCES[case.dtype])


def correctness_cases(device: str = "cpu") -> list[Case]:
    """The cases of the correctness-only pass: every op at sizes the Triton interpreter runs in seconds."""
    return [
        _upfirdn2d_case(2, 4, 8, torch.float32, device, "up2"),
        _upfirdn2d_case(2, 4, 16, torch.float32, device, "down2"),
        _bias_act_case(2, 4, 16, torch.float32, device),
        _epilogue_case(2, 4, 16, torch.float32, device),
        _filtered_lrelu_case(1, 2, 8, torch.float32, device),
    ]


# ------------------------------------------------------------------------------------------------------ timing


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a `nbytes` buffer."""
    import triton.testing  # here, not at the top: triton is optional (absent from some CPU-only torch installs)

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _fwd_bwd(fn: Callable[[], Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    def run() -> None:
        forward_backward(fn, inputs)

    return run


def time_case(case: Case, warmup: int, rep: int) -> Row:
    """Time the forward and the forward + backward of both impls, then check the closures just timed
    (`check_closures`: triton against ref, forward and gradients); the result is the Row's `check`. A kernel that
    fails while being timed raises `OpsFallbackWarning` out of here rather than timing the reference twice."""
    import triton.testing  # here, not at the top: triton is optional (absent from some CPU-only torch installs)

    closures = {impl: case.make(impl) for impl in IMPLS}
    times = {}
    with fallback_raises():
        for impl, (fn, inputs) in closures.items():
            times[f"fwd_{impl}"] = triton.testing.do_bench(fn, warmup=warmup, rep=rep)
            times[f"bwd_{impl}"] = triton.testing.do_bench(_fwd_bwd(fn, inputs), warmup=warmup, rep=rep)
    check = check_closures(case, closures)
    return Row(case, times["fwd_ref"], times["fwd_triton"], times["bwd_ref"], times["bwd_triton"], check)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def timing_table(rows: list[Row], copy_gbps: float) -> str:
    lines = [
        "| op | shape | dtype | fwd ref ms | fwd triton ms | fwd speed-up | fwd+bwd ref ms | fwd+bwd triton ms "
        "| fwd+bwd speed-up | triton GB/s | % of copy | check |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        gbps = r.gbps(r.fwd_triton_ms)
        pct = None if gbps is None else 100 * gbps / copy_gbps
        check = "-" if r.check is None else ("ok" if r.check.ok else "FAIL")
        lines.append(
            f"| {r.case.op} | {r.case.shape} | {_dtype_name(r.case.dtype)} | {r.fwd_ref_ms:.3f} | "
            f"{r.fwd_triton_ms:.3f} | {r.fwd_ref_ms / r.fwd_triton_ms:.2f}x | {r.bwd_ref_ms:.3f} | "
            f"{r.bwd_triton_ms:.3f} | {r.bwd_ref_ms / r.bwd_triton_ms:.2f}x | {_fmt(gbps, '.0f')} | "
            f"{_fmt(pct, '.0f')} | {check} |"
        )
    return "\n".join(lines)


SynthesisFactory = Callable[[int, torch.dtype, str], Case]


def run(
    quick: bool = False,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    warmup: int = 25,
    rep: int = 100,
    synthesis: SynthesisFactory | None = None,
    print_fn: Callable[[str], None] = print,
    targets: Sequence[str] | None = None,
) -> int:
    """Run the benchmark (CUDA) or the correctness-only pass (no CUDA) and print markdown, then the kernels
    compiled for `targets` (default: this GPU's architecture when it is one of `aot.GPU_TARGETS`; none without
    CUDA). Returns 0 when every check passed; raises `BenchCheckFailed` (exit status 1) after printing otherwise."""
    if not torch.cuda.is_available():
        status = correctness_pass(print_fn)
        return compile_pass(targets, print_fn) if targets else status
    if targets is None:
        major, minor = torch.cuda.get_device_capability()
        targets = [t for t in (f"sm_{major}{minor}",) if t in aot.GPU_TARGETS]
    device = "cuda"
    name = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps(device)
    print_fn(f"device: {name}, torch {torch.__version__}, device-to-device copy {copy_gbps:.0f} GB/s\n")
    resolutions = (16, 128) if quick else STYLEGAN2_RESOLUTIONS
    cases = target_cases(device) + stylegan2_cases(32, resolutions, dtypes, device)
    if synthesis is not None:
        cases.append(network_case(synthesis(256, torch.bfloat16, device)))
    status = timing_pass(cases, copy_gbps, warmup, rep, print_fn)
    return compile_pass(targets, print_fn) if targets else status


def timing_pass(
    cases: Sequence[Case], copy_gbps: float, warmup: int, rep: int, print_fn: Callable[[str], None] = print
) -> int:
    """Time and check every case (`time_case`), one progress line per case (and its FAIL lines at once), then the
    whole table; 0, or `BenchCheckFailed` when any check failed."""
    print_fn(_tolerance_line("cuda", [c.dtype for c in cases]) + "\n")
    rows: list[Row] = []
    checks: list[Check] = []
    for case in cases:
        try:
            row = time_case(case, warmup, rep)
        except Exception as err:  # a kernel that failed while timed, out of memory, ...: this case fails
            check = Check(case, error=_one_line(err))
        else:
            rows.append(row)
            check = row.check
            print_fn(timing_table(rows[-1:], copy_gbps).splitlines()[-1])  # progress, one line per case
        checks.append(check)
        for line in check.failure_lines():
            print_fn(line)
        torch.cuda.empty_cache()
    print_fn("\n" + timing_table(rows, copy_gbps))
    return _verdict(checks, print_fn)


def correctness_pass(print_fn: Callable[[str], None] = print) -> int:
    """No CUDA: run every case at small sizes through the Triton interpreter and compare with the reference.
    Returns 0 when all match (or when triton cannot run here at all); raises `BenchCheckFailed` otherwise."""
    print_fn("no CUDA device: no timings; correctness-only pass (Triton interpreter on the CPU, triton vs ref)\n")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels' first (lazy) import
    reason = triton_unavailable_reason(torch.empty(0))
    if reason is not None:
        print_fn(f"skipped: {reason}")
        return 0
    cases = correctness_cases("cpu")
    print_fn(_tolerance_line("cpu", [c.dtype for c in cases]) + "\n")
    lines = [
        "| op | shape | dtype | fwd max abs diff | fwd max abs diff / max abs ref | grads rel. L2 error (worst) | ok |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    checks = []
    for case in cases:
        check = check_case(case)
        checks.append(check)
        fwd, grad = check.forward, check.worst_grad
        cells = [None, None, None] if fwd is None else [fwd.max_abs, fwd.error, None if grad is None else grad.error]
        lines.append(
            f"| {case.op} | {case.shape} | {_dtype_name(case.dtype)} | "
            + " | ".join(_fmt(v, ".1e") for v in cells)
            + f" | {'yes' if check.ok else 'NO'} |"
        )
    print_fn("\n".join(lines))
    return _verdict(checks, print_fn)


def compile_pass(targets: Sequence[str], print_fn: Callable[[str], None] = print, workers: int = 2) -> int:
    """Compile every kernel variant the ops can launch for `targets` (no GPU needed; `pipeline.ops.aot`) and print
    their shared memory, registers and spills. Raises `BenchCheckFailed` when one fails to compile, needs more
    shared memory than its target has or spills in a hot (non-float64) variant."""
    print_fn(f"\ncompiled for {', '.join(targets)} (Triton ahead of time; every variant the ops can launch):\n")
    results, failures = aot.compile_space(targets, workers=workers)
    print_fn(aot.resource_table(results, most=5))
    bad = failures + [f"{aot.describe(r.variant)} on {r.target}: {'; '.join(aot.problems(r))}" for r in results
                      if aot.problems(r)]  # fmt: skip
    for line in bad:
        print_fn(f"FAIL {line}")
    if bad:
        raise BenchCheckFailed([], len(results) + len(failures), compile_failures=bad)
    return 0


def parse_dtypes(text: str) -> tuple[torch.dtype, ...]:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in table]
    if unknown or not names:
        raise ValueError(f"--dtypes: unknown {unknown or text!r}; use a comma-separated list of {sorted(table)}")
    return tuple(table[t] for t in names)
