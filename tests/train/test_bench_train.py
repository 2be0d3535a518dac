"""`ganpipe bench train`: the whole-step benchmark runs every family's phases through the engine and the bare loop,
prints one table whose parts add up to the step, says in one line that no reference comparison ran (`--compare`:
tests/train/test_bench_compare.py), and turns bad input into one line."""

from __future__ import annotations

import re

import pytest

from pipeline.cli import main
from tests.conftest import FAST_OVERRIDES, REPO, TINY_RECIPE

BIGGAN_TINY = str(REPO / "recipes" / "biggan" / "tiny.yaml")
# d_steps 2 (not the tiny recipe's 1): G steps every second step, so the schedule is part of what is timed
BIGGAN_FAST = [
    "model.ch=4", "model.d_ch=2", "model.z_dim=16", "model.shared_dim=8", "data.batch_size=8", "loss.d_steps=2"
]  # fmt: skip
QUICK = ["--warmup", "1", "--repeats", "1", "--device", "cpu"]
REST_ROWS = ("rest of the step body", "Lightning loop, loggers (rest)")


def _number(cell: str) -> float | None:
    cell = cell.strip().strip("*").replace("−", "-")
    return None if cell in ("", "–") else float(cell)


def rounding(values: list[float]) -> float:
    """The most that the printed values (ms: one decimal from 10 up, two below) and a printed total can be off
    from the exact ones, summed: half a unit of each one's last digit."""
    return sum(0.05 if abs(v) >= 10 else 0.005 for v in values) + 0.05


def breakdown(out: str) -> tuple[dict[str, tuple[str, float | None, float | None]], tuple[float, float]]:
    """The per-part table: {part: (runs, engine ms, bare ms)} and the step row's (engine, bare) ms."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| part (ms per step"))
    rows: dict[str, tuple[str, float | None, float | None]] = {}
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "**step**":
            engine, bare = _number(cells[2]), _number(cells[3])
            assert engine is not None and bare is not None
            return rows, (engine, bare)
        rows[cells[0]] = (cells[1], _number(cells[2]), _number(cells[3]))
    raise AssertionError(f"no step row in:\n{out}")


def check_table(out: str, phases: dict[str, int], steps: int) -> None:
    """Every phase ran as often as expected on both sides; measured parts (without the two remainders) sum to no
    more than the step, and everything to the step (within the table's rounding); the summary has img/s etc."""
    rows, (engine_step, bare_step) = breakdown(out)
    for name, runs in phases.items():
        assert name in rows, f"phase {name} missing:\n{out}"
        assert rows[name][0] == str(runs), (name, rows[name])
        engine_ms, bare_ms = rows[name][1], rows[name][2]
        assert engine_ms is not None and engine_ms > 0 and bare_ms is not None and bare_ms > 0, (name, rows[name])
    for part in ("gradient sync + optimizer step", "EMA of G", "data wait (batch to device)", "logging (self.log)"):
        assert part in rows and (rows[part][1] or 0) > 0, (part, rows.get(part))
    for side, step in ((1, engine_step), (2, bare_step)):
        measured = [r[side] for name, r in rows.items() if name not in REST_ROWS and r[side] is not None]
        everything = [r[side] for r in rows.values() if r[side] is not None]
        tolerance = rounding(everything)
        assert sum(measured) <= step + tolerance, (side, measured, step)
        assert all(rows[name][side] is None or rows[name][side] >= -tolerance for name in REST_ROWS), rows
        assert abs(sum(everything) - step) <= tolerance, (side, everything, step)
    for label in ("| img/s |", "| s/kimg |", "| ms/step |", "peak RSS, GiB"):
        assert label in out, label
    assert re.search(r"Engine overhead: [+-]\d+\.\d% of the bare step \([+−][\d.]+ ms/step\)", out), out
    assert re.search(r"Whole steps, engine / bare: \d\.\d{3}, the median of 1 alternating repeat", out), out
    assert f"| **step** | {steps} |" in out


def check_skipped(out: str, reason: str) -> None:
    """No reference comparison: exactly one line says so, and why."""
    said = [line for line in out.splitlines() if "Reference comparison" in line or "Side by side with" in line]
    assert len(said) == 1 and said[0].startswith(f"Reference comparison: skipped ({reason}"), said


def test_stylegan2_every_phase(capsys, one_torch_thread) -> None:
    # Greg and Dreg every 2nd step so that 2 timed steps run each phase once; `--compare nvlabs` without a path.
    overrides = ["loss.pl_weight=2", "loss.g_reg_interval=2", "loss.d_reg_interval=2"]
    code = main(
        ["bench", "train", TINY_RECIPE, *FAST_OVERRIDES, *overrides, "--steps", "2", *QUICK, "--compare", "nvlabs"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "stylegan2, 16x16, batch 8" in out
    check_table(out, {"Gmain": 2, "Greg": 1, "Dmain": 2, "Dreg": 1}, steps=2)
    check_skipped(
        out,
        "`--compare nvlabs` without a path: give `--compare nvlabs=PATH` with PATH a checkout of "
        "https://github.com/NVlabs/stylegan2-ada-pytorch)",
    )


def test_biggan_every_phase(capsys, one_torch_thread) -> None:
    code = main(["bench", "train", BIGGAN_TINY, *BIGGAN_FAST, "--steps", "2", *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    assert "biggan, 32x32, batch 8" in out
    check_table(out, {"Dmain": 2, "Gmain": 1}, steps=2)  # d_steps 2: G trains on every 2nd step
    check_skipped(
        out,
        "no `--compare`; `--compare biggan-pytorch=PATH` runs BigGAN-PyTorch code from a checkout of "
        "https://github.com/ajbrock/BigGAN-PyTorch side by side)",
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ([TINY_RECIPE, "data.batchsize=8"], "unknown config key 'data.batchsize'"),
        ([TINY_RECIPE, "--steps", "0"], "--steps 0 must be >= 1"),
        ([TINY_RECIPE, "--repeats", "0"], "--repeats 0 must be >= 1"),
    ],
)
def test_bad_input_is_one_line(capsys, args: list[str], message: str) -> None:
    code = main(["bench", "train", *args, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err


def test_compile_adds_the_eager_side(capsys, one_torch_thread) -> None:
    """With `train.compile=true` the bare loop also runs eagerly, alternating: its column, the speed-up and the
    compile time are printed, and the compiled parts still add up to the step (BigGAN: G and D compiled whole,
    with spectral norm's in-place power iteration and batch norm's running statistics inside the graphs)."""
    code = main(["bench", "train", BIGGAN_TINY, *BIGGAN_FAST, "train.compile=true", "--steps", "2", *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    check_table(out, {"Dmain": 2, "Gmain": 1}, steps=2)
    head = "| part (ms per step, mean of 2 steps) | runs | engine | bare loop | engine − bare | bare loop, eager |"
    assert head in out
    # --warmup 1 is raised to 2: BigGAN's G phase first runs at step 1, and its graphs compile in the warm-up
    assert "- 2 warm-up steps per side" in out
    assert re.search(r"Speed-up from compiling: \d+\.\d{3}x \(median of 1 repeat", out), out
    assert re.search(r"Compile time: -?\d+\.\d s, the engine's 2 warm-up steps", out), out
    step_row = next(line for line in out.splitlines() if line.startswith("| **step** |"))
    eager_ms = _number(step_row.strip().strip("|").split("|")[5])
    assert eager_ms is not None and eager_ms > 0
