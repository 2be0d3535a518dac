"""Every Triton kernel variant the ops can launch compiles ahead of time for sm_80 and sm_90 on this CPU machine,
fits the target's shared memory per block, and the ones training runs (all but float64) keep every value in
registers: a kernel that cannot run on a user's GPU fails here, not at their first step."""

from __future__ import annotations

import pytest

from pipeline.ops import aot
from pipeline.ops._dispatch import triton_installed
from pipeline.ops._tiles import filtered_lrelu_tiles, kernel_limit

pytestmark = pytest.mark.skipif(
    not triton_installed() or aot.cuobjdump() is None, reason="needs the triton package and its cuobjdump"
)


@pytest.fixture(scope="module")
def compiled() -> tuple[list[aot.CompiledVariant], list[str]]:
    return aot.compile_space(aot.GPU_TARGETS, workers=2)


def test_every_variant_compiles_for_sm80_and_sm90(compiled) -> None:
    results, failures = compiled
    assert failures == []
    space = aot.variant_space()
    assert len(results) == len(aot.GPU_TARGETS) * len(space)
    kinds = {(v.kernel, dict(v.pointers)["x_ptr"]) for v in space}
    assert len(kinds) == 4 * len(aot.DTYPES)  # every kernel in every dtype the ops accept


def test_every_variant_fits_shared_memory_and_the_hot_ones_do_not_spill(compiled) -> None:
    results, _ = compiled
    bad = [f"{aot.describe(r.variant)} on {r.target}: {'; '.join(aot.problems(r))}" for r in results if aot.problems(r)]
    assert bad == []
    assert max(r.shared_bytes for r in results if r.variant.kernel == "filtered_lrelu") > 0  # measured, not absent
    assert all(r.registers > 0 for r in results)


def test_the_space_holds_each_filtered_lrelu_tile_the_kernel_takes() -> None:
    # The tile pairs the op can pick, from its own rule over factors and filter lengths, are all compiled above.
    space = {(v["VB"], v["XB"]) for v in aot.variant_space() if v.kernel == "filtered_lrelu"}
    reachable = {
        (vb, xb)
        for up in range(1, 9)
        for down in range(1, 5)
        for up_taps in range(1, 49)
        for down_taps in range(1, 25)
        if kernel_limit(up, down, up_taps, down_taps) is None
        for _, vb, xb in [filtered_lrelu_tiles(up, down, up_taps, down_taps)]
    }
    assert reachable <= space and len(space) >= 5


def test_bench_ops_prints_the_compiled_resources(capsys) -> None:
    from pipeline.cli import main
    from pipeline.ops.bench import compile_pass

    assert main(["bench", "ops", "--targets", "sm_75"]) == 2
    assert "--targets 'sm_75': choose from sm_80, sm_90" in capsys.readouterr().err
    lines: list[str] = []
    assert compile_pass(["sm_90"], lines.append) == 0  # compiled above: served from Triton's cache
    rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| ") and " sm_90 | " in line]
    assert {row.split(" | ")[0].removeprefix("| ") for row in rows} >= set(aot._kernels().KERNELS)
