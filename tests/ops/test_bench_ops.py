"""`ganpipe bench ops` / tools/bench_ops.py: the CPU correctness-only pass, the timing table's arithmetic (with a
stand-in timer, since timings need CUDA), the whole-synthesis case, and that a wrong result or a failing kernel
fails the run (non-zero exit) in the correctness pass and in the timing pass, which checks the closures it timed
with the same function (`check_closures`)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.models.bench import synthesis_case
from pipeline.ops import bench

pytestmark = pytest.mark.usefixtures("interpreter")

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_tool_runs_correctness_pass_without_cuda_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the tool times; this checks the CPU pass")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ops.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout
    rows = _table_rows(out.stdout)
    assert {r.split("|")[1].strip() for r in rows} == {
        "upfirdn2d up2", "upfirdn2d down2", "bias_act", "modconv epilogue", "filtered_lrelu"}  # fmt: skip
    assert all(r.rstrip(" |").endswith("yes") for r in rows), out.stdout
    assert "FAIL" not in out.stdout


def test_tool_exits_1_when_a_kernel_gives_wrong_values():
    """Through the real entry point (`pipeline.cli.main`, which ignores return values): exit status 1, the FAIL line
    on stdout and the summary on stderr."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the tool times; this checks the CPU pass")
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported (and decorated)
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.ops import _triton_kernels
        real = _triton_kernels.scale_bias_act
        _triton_kernels.scale_bias_act = lambda *args, **kwargs: real(*args, **kwargs) * 1.01  # 1% off
        from pipeline.cli import main
        sys.exit(main(["bench", "ops"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.stdout, out.stderr)
    fail = [line for line in out.stdout.splitlines() if line.startswith("FAIL ")]
    assert fail and all(line.startswith("FAIL modconv epilogue [2,4,16,16] fp32: ") for line in fail), out.stdout
    assert "forward: max abs diff" in fail[0]
    assert "1 of 5 case(s) failed" in out.stderr and "modconv epilogue" in out.stderr
    rows = {r.split("|")[1].strip(): r.rstrip(" |").split("|")[-1].strip() for r in _table_rows(out.stdout)}
    assert rows == {"upfirdn2d up2": "yes", "upfirdn2d down2": "yes", "bias_act": "yes", "modconv epilogue": "NO",
                    "filtered_lrelu": "yes"}  # fmt: skip


def _wrong_by(case: bench.Case, delta: float) -> bench.Case:
    """The case with its triton closure's result off by `delta` (the ref closure untouched)."""

    def make(impl: str):
        fn, inputs = case.make(impl)
        return ((lambda: fn() + delta) if impl == "triton" else fn), inputs

    return bench.Case(case.op, case.shape, case.dtype, make, case.bytes_moved)


def test_correctness_pass_raises_nonzero_exit_on_wrong_result(monkeypatch):
    cases = bench.correctness_cases("cpu")[:3]
    monkeypatch.setattr(bench, "correctness_cases", lambda device="cpu": [cases[0], _wrong_by(cases[2], 0.5)])
    lines: list[str] = []
    with pytest.raises(SystemExit) as err:
        bench.correctness_pass(print_fn=lines.append)
    assert isinstance(err.value, bench.BenchCheckFailed)
    assert err.value.code and err.value.code != 0  # a message: the interpreter prints it and exits with 1
    assert [c.case.op for c in err.value.checks] == ["bias_act"]
    fail = [line for line in lines if line.startswith("FAIL ")]
    assert fail == [
        "FAIL bias_act [2,4,16,16] fp32: triton differs from ref, forward: max abs diff 5.000e-01 "
        f"(max|ref| {err.value.checks[0].forward.ref_max:.3e}); max abs diff / max|ref| = "
        f"{err.value.checks[0].forward.error:.3e} exceeds tolerance 1e-04"
    ]


@pytest.fixture
def break_kernel(monkeypatch):
    """break_kernel(name): that Triton launcher raises, as a compile error on an unsupported GPU would."""
    from pipeline.ops import _triton_kernels  # not at the top: needs triton, absent where `interpreter` skips

    def breaks(name: str) -> None:
        def broken(*args, **kwargs):
            raise RuntimeError("simulated kernel failure")

        monkeypatch.setattr(_triton_kernels, name, broken)

    return breaks


def test_correctness_pass_fails_when_a_kernel_fails(monkeypatch, break_kernel):
    """A kernel that raises would fall back to the reference and pass as ref against ref: it fails the run."""
    break_kernel("upfirdn2d")
    cases = bench.correctness_cases("cpu")[:1]
    monkeypatch.setattr(bench, "correctness_cases", lambda device="cpu": cases)
    lines: list[str] = []
    with pytest.raises(bench.BenchCheckFailed):
        bench.correctness_pass(print_fn=lines.append)
    (fail,) = [line for line in lines if line.startswith("FAIL ")]
    assert fail.startswith("FAIL upfirdn2d up2 [2,4,8,8] fp32: OpsFallbackWarning: ")
    assert "simulated kernel failure" in fail


@pytest.fixture
def fake_do_bench(monkeypatch):
    """triton.testing.do_bench that runs the closure once and returns 2 ms for ref, 0.5 ms for triton (the order
    of time_case: ref fwd, ref fwd+bwd, triton fwd, triton fwd+bwd)."""
    import triton.testing  # not at the top: triton may be absent (the `interpreter` fixture skips then)

    calls = []

    def fake(fn, warmup, rep):
        fn()
        calls.append(fn)
        return 2.0 if len(calls) % 4 in (1, 2) else 0.5

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    return calls


def test_timing_table_arithmetic(fake_do_bench):
    """GB/s = bytes moved / time, % of copy bandwidth, speed-up = ref / triton; every closure actually runs."""
    case = bench._bias_act_case(2, 4, 8, torch.float32, "cpu")
    row = bench.time_case(case, warmup=1, rep=1)
    assert len(fake_do_bench) == 4
    assert (row.fwd_ref_ms, row.fwd_triton_ms, row.bwd_ref_ms, row.bwd_triton_ms) == (2.0, 0.5, 2.0, 0.5)
    assert case.bytes_moved == 2 * 2 * 4 * 8 * 8 * 4
    assert row.gbps(0.5) == pytest.approx(case.bytes_moved / 0.5e-3 / 1e9)
    table = bench.timing_table([row], copy_gbps=row.gbps(0.5) * 2)
    cells = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
    assert cells[:3] == ["bias_act", "[2,4,8,8]", "fp32"]
    assert cells[5] == "4.00x" and cells[8] == "4.00x" and cells[10] == "50" and cells[11] == "ok"
    assert row.check is not None and row.check.ok


def test_time_case_checks_the_closures_it_timed(fake_do_bench):
    """The check runs the very closures that were timed (made once per impl), once more after the timing."""
    base = bench._bias_act_case(2, 4, 8, torch.float32, "cpu")
    made, runs = [], {"ref": 0, "triton": 0}

    def make(impl: str):
        fn, inputs = base.make(impl)
        made.append(impl)

        def counted():
            runs[impl] += 1
            return fn()

        return counted, inputs

    row = bench.time_case(bench.Case(base.op, base.shape, base.dtype, make, base.bytes_moved), warmup=1, rep=1)
    assert made == ["ref", "triton"] and runs == {"ref": 3, "triton": 3}  # fwd, fwd+bwd timed; then the check
    assert row.check.ok and len(row.check.diffs) == 3  # forward, d/dx, d/db


def test_timing_pass_fails_the_run_on_wrong_result_or_failing_kernel(fake_do_bench, break_kernel):
    """The CUDA path minus the device: every case is timed and checked; the table marks the wrong case, its FAIL
    line names it and its max abs diff, a kernel that fails while being timed is a FAIL too, and the run raises
    BenchCheckFailed after the whole table."""
    good = bench._bias_act_case(2, 4, 8, torch.float32, "cpu")
    wrong = _wrong_by(bench._upfirdn2d_case(2, 4, 8, torch.float32, "cpu", "up2"), 1e-2)
    fails = bench._filtered_lrelu_case(1, 2, 8, torch.float32, "cpu")
    break_kernel("filtered_lrelu")
    lines: list[str] = []
    with pytest.raises(bench.BenchCheckFailed) as err:
        bench.timing_pass([good, wrong, fails], copy_gbps=100.0, warmup=1, rep=1, print_fn=lines.append)
    assert [c.case.op for c in err.value.checks] == ["upfirdn2d up2", "filtered_lrelu"]
    assert "2 of 3 case(s) failed" in str(err.value)
    table = next(line for line in lines if line.startswith("\n| op |"))
    checks = [r.rstrip(" |").split("|")[-1].strip() for r in _table_rows(table)]
    assert checks == ["ok", "FAIL"]  # the failing kernel has no timings, no row
    fail = sorted({line for line in lines if line.startswith("FAIL ")})
    assert fail[0].startswith("FAIL filtered_lrelu [1,2,8,8] fp32: OpsFallbackWarning: ")
    assert fail[1].startswith("FAIL upfirdn2d up2 [2,4,8,8] fp32: triton differs from ref, forward: max abs diff ")
    assert float(fail[1].split("max abs diff ")[1].split()[0]) == pytest.approx(1e-2, rel=1e-3)


def test_compare_criteria():
    """Forward: max abs diff against max|ref|; gradients: the L2 norm, so one element on the other side of a kink
    (an O(1) difference there) passes where a consistent error of the same norm fails; NaN and shapes fail."""
    tol = bench.Tolerance(forward=1e-3, grads=1e-2)
    y = torch.linspace(-1, 1, 101)
    g = torch.ones(10_000)
    flipped = g.clone()
    flipped[17] = 0.2  # lrelu' on the other side of 0
    (fwd, grad) = bench.compare([y, g], [y + 5e-4, flipped], tol)
    assert fwd.ok and fwd.max_abs == pytest.approx(5e-4, rel=1e-3) and fwd.error == pytest.approx(5e-4, rel=1e-3)
    assert grad.ok and grad.max_abs == pytest.approx(0.8) and grad.error == pytest.approx(0.008, rel=1e-3)
    assert not bench.compare([y, g], [y + 2e-3, g], tol)[0].ok
    assert not bench.compare([y, g], [y, g * 1.02], tol)[1].ok
    nan = y.clone()
    nan[3] = math.nan
    assert not bench.compare([y, g], [nan, g], tol)[0].ok
    mismatch = bench.compare([y, g], [y[:-1], g], tol)[0]
    assert not mismatch.ok and "triton gave [100]" in mismatch.describe()
    together = bench.compare([y, g, g], [y, flipped, g * 1.001], bench.Tolerance(1e-3, 1e-2, grads_together=True))
    assert len(together) == 2 and together[1].ok and together[1].what == "gradients of all 2 inputs together"


def test_parse_dtypes():
    assert bench.parse_dtypes("fp32, bf16") == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown"):
        bench.parse_dtypes("fp8")


def test_synthesis_case_triton_matches_ref():
    """The end-to-end case: a StyleGAN2 synthesis network (paper256 widths, 8px) passes the bench's own check: the
    same random noise in both runs (the check seeds each), forward and all parameter gradients; in float32 on the
    CPU to 1e-4, well inside `network_case`'s tolerance."""
    torch.manual_seed(0)
    case = synthesis_case(8, torch.float32, "cpu", batch=1)
    assert bench.network_case(case).tolerance == bench.NETWORK_TOLERANCES[torch.float32]
    check = bench.check_case(replace(case, tolerance=bench.Tolerance(1e-4, 1e-4, grads_together=True)))
    assert check.ok, check.error or [d.describe() for d in check.diffs]
    assert [d.what for d in check.diffs] == ["forward", f"gradients of all {len(case.make('ref')[1])} inputs together"]
