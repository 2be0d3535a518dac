"""`ganpipe bench ops` / tools/bench_ops.py: the CPU correctness-only pass, the timing table's arithmetic (with a
stand-in timer, since timings need CUDA) and the whole-synthesis case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models.bench import stylegan2_synthesis_case
from pipeline.ops import bench

pytestmark = pytest.mark.usefixtures("interpreter")

ROOT = Path(__file__).resolve().parents[2]


def test_tool_runs_correctness_pass_without_cuda_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("with CUDA the tool times; this checks the CPU pass")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_ops.py")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "no CUDA device" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {r.split("|")[1].strip() for r in rows} == {
        "upfirdn2d up2", "upfirdn2d down2", "bias_act", "modconv epilogue", "filtered_lrelu"}  # fmt: skip
    assert all(r.rstrip(" |").endswith("yes") for r in rows), out.stdout


def test_timing_table_arithmetic(monkeypatch):
    """GB/s = bytes moved / time, % of copy bandwidth, speed-up = ref / triton; every closure actually runs."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep):
        fn()
        calls.append(fn)
        return 2.0 if len(calls) % 4 in (1, 2) else 0.5  # ref fwd, ref fwd+bwd, triton fwd, triton fwd+bwd

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    case = bench._bias_act_case(2, 4, 8, torch.float32, "cpu")
    row = bench.time_case(case, warmup=1, rep=1)
    assert len(calls) == 4
    assert (row.fwd_ref_ms, row.fwd_triton_ms, row.bwd_ref_ms, row.bwd_triton_ms) == (2.0, 0.5, 2.0, 0.5)
    assert case.bytes_moved == 2 * 2 * 4 * 8 * 8 * 4
    assert row.gbps(0.5) == pytest.approx(case.bytes_moved / 0.5e-3 / 1e9)
    table = bench.timing_table([row], copy_gbps=row.gbps(0.5) * 2)
    cells = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
    assert cells[:3] == ["bias_act", "[2,4,8,8]", "fp32"]
    assert cells[5] == "4.00x" and cells[8] == "4.00x" and cells[10] == "50"


def test_parse_dtypes():
    assert bench.parse_dtypes("fp32, bf16") == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown"):
        bench.parse_dtypes("fp8")


def test_synthesis_case_triton_matches_ref():
    """The end-to-end case: a StyleGAN2 synthesis network (paper256 widths, 8px), same noise: same images."""
    torch.manual_seed(0)
    case = stylegan2_synthesis_case(8, torch.float32, "cpu", batch=2)
    fn, _ = case.make("ref")
    torch.manual_seed(1)
    a = fn()
    torch.manual_seed(1)
    b = case.make("triton")[0]()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
