"""`ganpipe bench train --compare`: the reference codebases' own training steps, side by side with the engine.

The comparisons themselves need checkouts of NVlabs/stylegan2-ada-pytorch and ajbrock/BigGAN-PyTorch, which are
not part of this project and not in CI: `GANPIPE_NVLABS_CHECKOUT` / `GANPIPE_BIGGAN_PYTORCH_CHECKOUT` name them, or
a local bare mirror under `GANPIPE_MIRROR` (default /work/.mirror) is cloned into a temporary folder; without either
those tests skip and say why. The one-line errors for a bad `--compare` and the one-line skip run everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.train import bench_compare
from tests.conftest import FAST_OVERRIDES, TINY_RECIPE
from tests.train.test_bench_train import BIGGAN_FAST, BIGGAN_TINY, QUICK, check_table, rounding

MIRROR = Path(os.environ.get("GANPIPE_MIRROR", "/work/.mirror"))
CHECKOUTS = {  # name -> (environment variable, mirror folder, what the module names it imports are)
    "nvlabs": ("GANPIPE_NVLABS_CHECKOUT", "NVlabs+stylegan2-ada-pytorch", ("training", "torch_utils", "dnnlib")),
    "biggan-pytorch": (
        "GANPIPE_BIGGAN_PYTORCH_CHECKOUT",
        "ajbrock+BigGAN-PyTorch",
        ("utils", "layers", "losses", "train_fns", "BigGAN", "datasets", "sync_batchnorm"),
    ),
}
EVERY_SG2_PHASE = ["loss.pl_weight=2", "loss.g_reg_interval=2", "loss.d_reg_interval=2"]


def _checkout(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    variable, mirror, _ = CHECKOUTS[name]
    given = os.environ.get(variable)
    if given:
        return Path(given)
    for git_dir in (MIRROR / mirror, MIRROR / mirror / "repo"):
        if (git_dir / "HEAD").is_file() and (git_dir / "objects").is_dir():
            dest = tmp_path_factory.mktemp(name) / "checkout"
            subprocess.run(["git", "clone", "-q", str(git_dir), str(dest)], check=True, timeout=300)
            return dest
    repository = bench_compare.REFERENCE_KINDS[name].repository
    pytest.skip(f"no {name} checkout: set {variable} to a checkout of {repository} (CI has none)")


@pytest.fixture(scope="session")
def nvlabs_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkout("nvlabs", tmp_path_factory)


@pytest.fixture(scope="session")
def biggan_pytorch_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkout("biggan-pytorch", tmp_path_factory)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _float(cell: str) -> float:
    return float(cell.strip().strip("*").replace("−", "-"))


def check_comparison(out: str, name: str, title: str, commit: str) -> None:
    """The --compare section: the reference's commit, a passed like-for-like check, its img/s, ms/step and both
    ratios (consistent with the step times), and the medians line."""
    assert f"Side by side with {title} (`--compare {name}=PATH`)" in out, out
    assert f"at commit {commit}, imported from" in out, out
    check = re.search(r"largest \|ganpipe − reference\| G (\S+), D (\S+) \(the limit is 0.001\)", out)
    assert check is not None, out
    assert float(check.group(1)) <= 1e-3 and float(check.group(2)) <= 1e-3, check.group(0)
    lines = out.splitlines()
    head = lines.index(f"| | {name} | engine / {name} | bare / {name} |")
    rows = {_cells(line)[0]: _cells(line)[1:] for line in lines[head + 2 : head + 6]}
    assert set(rows) >= {"img/s", "s/kimg", "ms/step"}, rows
    ref_ms, engine_ratio, bare_ratio = (_float(c) for c in rows["ms/step"])
    engine_table = next(_cells(line) for line in lines if line.startswith("| ms/step |"))
    assert ref_ms > 0 and engine_ratio > 0 and bare_ratio > 0
    assert engine_ratio == pytest.approx(_float(engine_table[1]) / ref_ms, rel=0.02, abs=2e-3), (engine_table, rows)
    assert bare_ratio == pytest.approx(_float(engine_table[2]) / ref_ms, rel=0.02, abs=2e-3), (engine_table, rows)
    assert re.search(
        rf"Whole steps against {name}, medians of 1 alternating repeat: engine / {name} \d+\.\d{{3}} \(range .*\); "
        rf"bare loop / {name} \d+\.\d{{3}} \(range ",
        out,
    ), out
    assert "Reference comparison: skipped" not in out


def _commit(checkout: Path) -> str:
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.stdout.strip()


def _modules_left(name: str) -> list[str]:
    return [m for m in sys.modules if m.split(".")[0] in CHECKOUTS[name][2]]


def test_compare_nvlabs(capsys, one_torch_thread, nvlabs_checkout: Path) -> None:
    code = main([
        "bench", "train", TINY_RECIPE, *FAST_OVERRIDES, *EVERY_SG2_PHASE, "--steps", "2", *QUICK,
        "--compare", f"nvlabs={nvlabs_checkout}",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    check_table(out, {"Gmain": 2, "Greg": 1, "Dmain": 2, "Dreg": 1}, steps=2)
    check_comparison(out, "nvlabs", "NVIDIA's StyleGAN2-ADA", _commit(nvlabs_checkout))
    assert "ops: on the CPU its PyTorch reference implementations" in out
    # The parts table has an nvlabs column: every phase ran, and its parts add up to its step.
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| part (ms per step"))
    assert _cells(lines[head])[-1] == "nvlabs", lines[head]
    column: dict[str, str] = {}
    for line in lines[head + 2 :]:
        cells = _cells(line)
        column[cells[0]] = cells[-1]
        if cells[0] == "**step**":
            break
    for phase in ("Gmain", "Greg", "Dmain", "Dreg", "gradient sync + optimizer step", "EMA of G"):
        assert _float(column[phase]) > 0, (phase, column)
    parts = [_float(v) for k, v in column.items() if k != "**step**" and v != "–"]
    assert abs(sum(parts) - _float(column["**step**"])) <= rounding(parts), column
    # Nothing of the checkout stays importable.
    assert str(nvlabs_checkout) not in sys.path and str(nvlabs_checkout.resolve()) not in sys.path
    assert _modules_left("nvlabs") == []


def test_compare_biggan_pytorch(capsys, one_torch_thread, biggan_pytorch_checkout: Path) -> None:
    code = main([
        "bench", "train", BIGGAN_TINY, *BIGGAN_FAST, "--steps", "2", *QUICK,
        "--compare", f"biggan-pytorch={biggan_pytorch_checkout}",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    check_table(out, {"Dmain": 2, "Gmain": 1}, steps=2)
    check_comparison(out, "biggan-pytorch", "BigGAN-PyTorch", _commit(biggan_pytorch_checkout))
    assert "`train_fns.GAN_training_function` (2 D steps" in out
    assert str(biggan_pytorch_checkout.resolve()) not in sys.path
    assert _modules_left("biggan-pytorch") == []


def test_biggan_pytorch_steps_are_whole_calls(capsys, biggan_pytorch_checkout: Path) -> None:
    """One call of BigGAN-PyTorch's step is `loss.d_steps` engine steps: --steps must be a multiple."""
    args = [BIGGAN_TINY, *BIGGAN_FAST, "--steps", "3", *QUICK, "--compare", f"biggan-pytorch={biggan_pytorch_checkout}"]
    code = main(["bench", "train", *args])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "--steps 3 must be a multiple of loss.d_steps=2" in lines[0], captured.err


@pytest.mark.parametrize("name", ["nvlabs", "biggan-pytorch"])
def test_networks_that_differ_are_refused(capsys, monkeypatch, request, name: str) -> None:
    """The like-for-like check: G's weights nudged on their way into the reference -> a one-line refusal."""
    checkout = request.getfixturevalue("nvlabs_checkout" if name == "nvlabs" else "biggan_pytorch_checkout")
    load = bench_compare._load

    def nudged(flag: str, net: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        if what == "G":
            state = {k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}
        load(flag, net, state, what)

    monkeypatch.setattr(bench_compare, "_load", nudged)
    args = [TINY_RECIPE, *FAST_OVERRIDES] if name == "nvlabs" else [BIGGAN_TINY, *BIGGAN_FAST]
    code = main(["bench", "train", *args, "--steps", "2", *QUICK, "--compare", f"{name}={checkout}"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert re.search(r"refusing to compare: .*largest \|ganpipe - reference\| on one batch: G [\d.e+-]+, D", lines[0])
    assert _modules_left(name) == []


def _fake_checkout(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


NVLABS_FILES = bench_compare.REFERENCE_KINDS["nvlabs"].required


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "partial", "unknown", "family", "augment", "import"],
)
def test_bad_compare_is_one_line(capsys, tmp_path: Path, case: str) -> None:
    nv = "https://github.com/NVlabs/stylegan2-ada-pytorch"
    recipe, extra = TINY_RECIPE, [*FAST_OVERRIDES]
    if case == "missing":
        value, message = f"nvlabs={tmp_path / 'nowhere'}", f"{tmp_path / 'nowhere'} does not exist (expected a "
        message += f"checkout of {nv} with training/loss.py)"
    elif case == "empty":
        value, message = f"nvlabs={tmp_path}", f"{tmp_path} has no training/loss.py: not a checkout of {nv}"
    elif case == "partial":
        _fake_checkout(tmp_path, {"BigGAN.py": "", "utils.py": ""})
        recipe, extra = BIGGAN_TINY, [*BIGGAN_FAST]
        value = f"biggan-pytorch={tmp_path}"
        message = f"{tmp_path} has no train_fns.py: not a checkout of https://github.com/ajbrock/BigGAN-PyTorch"
    elif case == "unknown":
        value, message = "stylegan3=/x", "unknown reference 'stylegan3'; choose one of nvlabs (stylegan2), "
    elif case == "family":
        value, message = f"biggan-pytorch={tmp_path}", "biggan-pytorch compares biggan recipes, this one is "
        message += "stylegan2: use --compare nvlabs=PATH"
    elif case == "augment":
        _fake_checkout(tmp_path, dict.fromkeys(NVLABS_FILES, ""))
        extra.append("augment.kind=ada")
        value, message = f"nvlabs={tmp_path}", "cannot compare like for like: the recipe augments D's inputs "
        message += "(augment.kind=ada); the comparison runs both sides without augmentation: add augment.kind=none"
    else:  # a checkout whose code fails to import: one line, and the process's modules as they were
        _fake_checkout(tmp_path, {**dict.fromkeys(NVLABS_FILES, ""), "training/networks.py": "raise OSError('x')"})
        value, message = f"nvlabs={tmp_path}", f"importing training.networks from {tmp_path} failed (OSError: x)"
    code = main(["bench", "train", recipe, *extra, "--steps", "2", *QUICK, "--compare", value])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and f"--compare {value}" in lines[0] and message in lines[0], captured.err
    assert _modules_left("nvlabs") == [] and _modules_left("biggan-pytorch") == []
