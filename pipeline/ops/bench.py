"""Reference vs Triton for every op on StyleGAN2's shapes: what `tools/bench_ops.py` and `ganpipe bench ops` run.

On a CUDA device, for each case it times the forward and the forward + backward with `impl='ref'` and with
`impl='triton'` (`triton.testing.do_bench`: median over repeats, L2 flushed between runs), reports the achieved
GB/s of the forward for the memory-bound ops (bytes that must move at least once, read + written, over time) and
its fraction of the device-to-device copy bandwidth measured in the same run, and the speed-up ref/triton.
Without CUDA it says so and runs a correctness-only pass: the same cases at small sizes under Triton's CPU
interpreter, triton against ref, forward and gradients.

Cases (batch 32, channels from StyleGAN2 config F: min(32768 / res, 512), at least 64):
    upfirdn2d up2 / down2   4-tap [1, 3, 3, 1] filter, 2x upsampling res/2 -> res and 2x downsampling res -> res/2
    bias_act                lrelu, per-channel bias, gain sqrt(2), clamp 256 (a conv layer's epilogue)
    modconv epilogue        clamp(lrelu(y * d[n, c] + noise + b[c]) * gain): the non-fused modulated
                            convolution's output stage, `ganpipe::scale_bias_act` vs the reference's torch ops
    filtered_lrelu          StyleGAN3's 2x up, 12-tap, lrelu, 2x down (the composed fused ops)
    synthesis               a whole synthesis network forward + backward (when the caller supplies one)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

STYLEGAN2_RESOLUTIONS = (8, 16, 32, 64, 128, 256, 1024)


def config_f_channels(resolution: int) -> int:
    return max(64, min(32768 // resolution, 512))


@dataclass(frozen=True)
class Case:
    """One benchmark case: `make(impl)` returns a zero-argument forward closure and the tensors that require
    grad; `bytes_moved` is the forward's minimum memory traffic (None for compute-bound cases)."""

    op: str
    shape: str
    dtype: torch.dtype
    make: Callable[[str], tuple[Callable[[], Tensor], list[Tensor]]]
    bytes_moved: int | None


@dataclass
class Row:
    case: Case
    fwd_ref_ms: float
    fwd_triton_ms: float
    bwd_ref_ms: float
    bwd_triton_ms: float

    def gbps(self, ms: float) -> float | None:
        return None if self.case.bytes_moved is None else self.case.bytes_moved / (ms * 1e-3) / 1e9


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def _randn(shape: Sequence[int], dtype: torch.dtype, device: str, grad: bool = True) -> Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _upfirdn2d_case(n: int, c: int, in_res: int, dtype: torch.dtype, device: str, mode: str) -> Case:
    """mode 'up2': [n, c, in_res, in_res] -> 2 in_res; 'down2': -> in_res / 2 (4-tap filter, padding as NVIDIA's)."""
    from pipeline.ops import downsample2d, setup_filter, upsample2d

    f = setup_filter([1, 3, 3, 1], device=torch.device(device))
    x = _randn((n, c, in_res, in_res), dtype, device)
    fn = upsample2d if mode == "up2" else downsample2d
    out_res = in_res * 2 if mode == "up2" else in_res // 2
    bytes_moved = (in_res * in_res + out_res * out_res) * n * c * x.element_size()

    def make(impl: str):
        return (lambda: fn(x, f, impl=impl)), [x]

    return Case(f"upfirdn2d {mode}", f"[{n},{c},{in_res},{in_res}]", dtype, make, bytes_moved)


def _bias_act_case(n: int, c: int, res: int, dtype: torch.dtype, device: str) -> Case:
    from pipeline.ops import bias_act

    x = _randn((n, c, res, res), dtype, device)
    b = _randn((c,), dtype, device)

    def make(impl: str):
        return (lambda: bias_act(x, b, act="lrelu", gain=math.sqrt(2), clamp=256.0, impl=impl)), [x, b]

    return Case("bias_act", f"[{n},{c},{res},{res}]", dtype, make, 2 * x.numel() * x.element_size())


def _epilogue_case(n: int, c: int, res: int, dtype: torch.dtype, device: str) -> Case:
    from pipeline.ops import bias_act
    from pipeline.ops._custom_ops import scale_bias_act_op

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
    from pipeline.ops import filtered_lrelu, setup_filter

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


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a `nbytes` buffer."""
    import triton.testing

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _fwd_bwd(fn: Callable[[], Tensor], inputs: list[Tensor]) -> Callable[[], None]:
    def run() -> None:
        y = fn()
        torch.autograd.grad(y, inputs, torch.ones_like(y))

    return run


def time_case(case: Case, warmup: int, rep: int) -> Row:
    import triton.testing

    times = {}
    for impl in ("ref", "triton"):
        fn, inputs = case.make(impl)
        times[f"fwd_{impl}"] = triton.testing.do_bench(fn, warmup=warmup, rep=rep)
        times[f"bwd_{impl}"] = triton.testing.do_bench(_fwd_bwd(fn, inputs), warmup=warmup, rep=rep)
    return Row(case, times["fwd_ref"], times["fwd_triton"], times["bwd_ref"], times["bwd_triton"])


def check_case(case: Case) -> float:
    """Largest |triton - ref| relative to max |ref| over the forward and every input gradient."""
    worst = 0.0
    results = []
    for impl in ("ref", "triton"):
        fn, inputs = case.make(impl)
        y = fn()
        grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
        results.append([y.detach(), *grads])
    for a, b in zip(*results, strict=True):
        scale = a.abs().max().clamp_min(1e-12)
        worst = max(worst, float(((a.float() - b.float()).abs().max() / scale).item()))
    return worst


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def timing_table(rows: list[Row], copy_gbps: float) -> str:
    lines = [
        "| op | shape | dtype | fwd ref ms | fwd triton ms | fwd speed-up | fwd+bwd ref ms | fwd+bwd triton ms "
        "| fwd+bwd speed-up | triton GB/s | % of copy |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        gbps = r.gbps(r.fwd_triton_ms)
        pct = None if gbps is None else 100 * gbps / copy_gbps
        lines.append(
            f"| {r.case.op} | {r.case.shape} | {_dtype_name(r.case.dtype)} | {r.fwd_ref_ms:.3f} | "
            f"{r.fwd_triton_ms:.3f} | {r.fwd_ref_ms / r.fwd_triton_ms:.2f}x | {r.bwd_ref_ms:.3f} | "
            f"{r.bwd_triton_ms:.3f} | {r.bwd_ref_ms / r.bwd_triton_ms:.2f}x | {_fmt(gbps, '.0f')} | "
            f"{_fmt(pct, '.0f')} |"
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
) -> int:
    """Run the benchmark (CUDA) or the correctness-only pass (no CUDA) and print markdown. Returns 0."""
    if not torch.cuda.is_available():
        return correctness_pass(print_fn)
    device = "cuda"
    name = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps(device)
    print_fn(f"device: {name}, torch {torch.__version__}, device-to-device copy {copy_gbps:.0f} GB/s\n")
    resolutions = (16, 128) if quick else STYLEGAN2_RESOLUTIONS
    cases = target_cases(device) + stylegan2_cases(32, resolutions, dtypes, device)
    if synthesis is not None:
        cases.append(synthesis(256, torch.bfloat16, device))
    rows = []
    for case in cases:
        rows.append(time_case(case, warmup, rep))
        print_fn(timing_table(rows[-1:], copy_gbps).splitlines()[-1])  # progress, one line per case
        torch.cuda.empty_cache()
    print_fn("\n" + timing_table(rows, copy_gbps))
    return 0


def correctness_pass(print_fn: Callable[[str], None] = print) -> int:
    """No CUDA: run every case at small sizes through the Triton interpreter and compare with the reference."""
    print_fn("no CUDA device: no timings; correctness-only pass (Triton interpreter on the CPU, triton vs ref)\n")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from pipeline.ops._dispatch import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.empty(0))
    if reason is not None:
        print_fn(f"skipped: {reason}")
        return 0
    device = "cpu"
    cases = [
        _upfirdn2d_case(2, 4, 8, torch.float32, device, "up2"),
        _upfirdn2d_case(2, 4, 16, torch.float32, device, "down2"),
        _bias_act_case(2, 4, 16, torch.float32, device),
        _epilogue_case(2, 4, 16, torch.float32, device),
        _filtered_lrelu_case(1, 2, 8, torch.float32, device),
    ]
    lines = ["| op | shape | dtype | max rel. error (fwd and grads) | ok |", "| --- | --- | --- | ---: | --- |"]
    failures = 0
    for case in cases:
        err = check_case(case)
        ok = err < 1e-4
        failures += not ok
        lines.append(f"| {case.op} | {case.shape} | {_dtype_name(case.dtype)} | {err:.1e} | {'yes' if ok else 'NO'} |")
    print_fn("\n".join(lines))
    if failures:
        print_fn(f"\n{failures} case(s) differ from the reference beyond 1e-4: run `pytest tests/ops` for details")
    return 0


def parse_dtypes(text: str) -> tuple[torch.dtype, ...]:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in table]
    if unknown or not names:
        raise ValueError(f"--dtypes: unknown {unknown or text!r}; use a comma-separated list of {sorted(table)}")
    return tuple(table[t] for t in names)
