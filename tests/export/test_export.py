from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pipeline.errors import ExportError, SamplingError
from pipeline.export import export_generator, load_generator, load_sampler
from pipeline.export.generate import parse_seeds
from pipeline.families import get_family
from pipeline.models.stylegan_sampling import StyleGANOptions
from pipeline.train import list_checkpoints, load_checkpoint, train
from tests.conftest import REPO


@pytest.fixture
def trained_run(make_config):
    cfg = make_config("train.total_kimg=0.016")
    train(cfg)
    return cfg


def test_export_round_trip_gives_identical_images(trained_run, tmp_path) -> None:
    out = tmp_path / "export"
    meta = export_generator(trained_run.run_dir, str(out))
    assert (out / "generator.safetensors").exists()
    info = json.loads((out / "generator.json").read_text())
    assert info["family"] == "stylegan2" and info["resolution"] == 16 and info["kimg"] == meta.kimg == 0.016
    assert info["source"].endswith(".pt") and info["version"] == 2
    assert info["conditioning"] == {"kind": "none"} and info["z_dim"] == 16

    state = load_checkpoint(list_checkpoints(trained_run.run_dir)[-1])
    family = get_family("stylegan2")
    spec = family.spec(trained_run.model, 16)
    reference = family.build_generator(spec)
    reference.load_state_dict(state["G_ema"])
    reference.eval()
    seeds, psi = parse_seeds("0-5"), StyleGANOptions(truncation_psi=0.7)
    a = family.make_sampler(reference, family.build_conditioning(spec)).generate(seeds, options=psi)
    b = load_sampler(str(out)).generate(seeds, options=psi)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # The checkpoint itself is a source too: the same images without an export.
    assert torch.equal(load_sampler(trained_run.run_dir).generate(seeds, options=psi), a)
    assert torch.equal(load_generator(str(out)).state_dict()["mapping.w_avg"], state["G_ema"]["mapping.w_avg"])


def test_load_generator_never_unpickles_and_reports_bad_files(tmp_path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_generator(str(tmp_path))
    (tmp_path / "generator.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExportError, match="not a ganpipe generator export"):
        load_generator(str(tmp_path))


def test_corrupt_weights_are_reported(trained_run, tmp_path) -> None:
    out = tmp_path / "export"
    export_generator(trained_run.run_dir, str(out))
    (out / "generator.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="safetensors"):
        load_generator(str(out))


def test_parse_seeds() -> None:
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds("4294967295") == [2**32 - 1]
    with pytest.raises(SamplingError, match="descending"):
        parse_seeds("5-2")
    with pytest.raises(SamplingError, match="invalid"):
        parse_seeds("a-b")
    with pytest.raises(SamplingError, match=r"--seeds 4294967296 is out of range: seeds are 0\.\.4294967295"):
        parse_seeds("4294967290-4294967296")


def test_cli_export_and_generate(trained_run, tmp_path) -> None:
    out = tmp_path / "export"
    run = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*run, "export", trained_run.run_dir, "--out", str(out)], check=True, cwd=REPO)
    grid = tmp_path / "grid.png"
    subprocess.run(
        [
            *run,
            "generate",
            str(out),
            "--seeds",
            "0-8",
            "--trunc",
            "0.7",
            "--out",
            str(grid),
            "--outdir",
            str(tmp_path / "imgs"),
        ],
        check=True,
        cwd=REPO,
    )
    assert Image.open(grid).size == (3 * 16, 3 * 16)
    assert len(list((tmp_path / "imgs").glob("seed*.png"))) == 9
    bad = subprocess.run(
        [*run, "generate", str(out), "--class", "3", "--out", str(grid)], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and "--class is not available: this stylegan2 generator is unconditional" in bad.stderr
    checkpoint = list_checkpoints(trained_run.run_dir)[-1]
    usage = subprocess.run([*run, "generate", checkpoint, "--help"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 0 and "--trunc PSI" in usage.stdout and "--style-mix" in usage.stdout
    assert "--class C" not in usage.stdout and "--prompt" not in usage.stdout
