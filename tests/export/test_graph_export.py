"""ONNX and torch.export programs of a StyleGAN2 generator: standard operators only, one file for every batch size,
the truncation value as an input, class indices for a conditional model, uint8 NHWC output, all checked against
PyTorch with onnxruntime and torch themselves (not through ganpipe's runners); a file changed after export is
refused in one line; the README's onnxruntime-only example runs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.errors import ExportError
from pipeline.export import export_generator, load_sampler
from pipeline.export.format import ExportedGenerator, write_export
from pipeline.export.runtime import open_graph_sampler
from pipeline.families import get_family
from pipeline.models.conditioning import Request
from pipeline.models.sampling import seed_latents
from pipeline.models.stylegan_sampling import StyleGANOptions
from tests.conftest import REPO

MODEL = {"z_dim": 32, "w_dim": 32, "mapping": {"num_layers": 2}, "synthesis": {"channel_base": 1024, "channel_max": 32}}


def _export(folder: Path, c_dim: int = 0, num_fp16_res: int = 0) -> str:
    """An export folder of a randomly initialised 32px generator whose w_avg is far from 0 (so psi matters)."""
    family = get_family("stylegan2")
    model = {**MODEL, "c_dim": c_dim}
    if num_fp16_res:
        model["synthesis"] = {**MODEL["synthesis"], "num_fp16_res": num_fp16_res, "conv_clamp": 256}
    torch.manual_seed(c_dim)
    G = family.build_generator(family.spec(model, 32))
    with torch.no_grad():
        G.mapping.w_avg.normal_(0, 2)
    write_export(str(folder), ExportedGenerator("stylegan2", model, 32), {"G_ema": G.state_dict()})
    return str(folder)


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory) -> str:
    folder = _export(tmp_path_factory.mktemp("graphs") / "export")
    export_generator(folder, folder, ["onnx", "pt2"])
    return folder


def _eager(folder: str, seeds: list[int], psi: float, class_idx: int | None = None) -> np.ndarray:
    options = StyleGANOptions(truncation_psi=psi, truncation_center="global")
    return load_sampler(folder).generate(seeds, Request(class_idx=class_idx), options).numpy()


def test_onnx_matches_pytorch_for_any_batch_size_and_truncation(unconditional: str) -> None:
    record = json.loads(Path(unconditional, "generator.json").read_text())["formats"]["onnx"]
    assert record["opset"] == 18 and record["verified"]["max_abs_diff"] < 1e-4
    model = onnx.load(f"{unconditional}/generator.onnx")
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    session = ort.InferenceSession(f"{unconditional}/generator.onnx", providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("z", ["batch", 32]), ("truncation_psi", [])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("images", ["batch", 3, 32, 32])]
    outputs = {}
    for seeds in ([7], list(range(8))):  # batch 1 and batch 8 from the one file
        for psi in (0.5, 1.0):
            z = seed_latents(seeds, 32).numpy()
            (images,) = session.run(None, {"z": z, "truncation_psi": np.array(psi, np.float32)})
            assert np.abs(images - _eager(unconditional, seeds, psi)).max() < 1e-4
            outputs[len(seeds), psi] = images
    assert np.abs(outputs[8, 0.5] - outputs[8, 1.0]).max() > 0.1  # the truncation input takes effect
    np.testing.assert_allclose(outputs[1, 0.5][0], outputs[8, 0.5][7], atol=1e-5)  # row 7 of 8 is seed 7 alone


def test_the_pt2_program_matches_pytorch(unconditional: str) -> None:
    program = torch.export.load(f"{unconditional}/generator.pt2")  # a file this test just wrote
    for seeds in ([3], list(range(5))):
        images = program.module()(seed_latents(seeds, 32), torch.tensor(0.7))
        assert np.abs(images.numpy() - _eager(unconditional, seeds, 0.7)).max() < 1e-4


def test_float16_blocks_export_as_float32_and_match_the_cpu_sampler(tmp_path: Path) -> None:
    # The ffhq recipes train the top resolutions in float16; the graph and the CPU sampler both compute in float32.
    folder = _export(tmp_path / "export", num_fp16_res=2)
    export_generator(folder, folder, ["onnx"])  # verifies itself at 1e-4
    model = onnx.load(f"{folder}/generator.onnx")
    float16 = onnx.TensorProto.FLOAT16
    assert all(a.i != float16 for node in model.graph.node for a in node.attribute if a.name == "to")  # no Cast to fp16
    seeds = list(range(4))
    G = load_sampler(folder).G
    with torch.no_grad():
        ws = G.mapping(seed_latents(seeds, 32), None)
        fp16, fp32 = (G.synthesis(ws, noise_mode="const", force_fp32=f).numpy() for f in (False, True))
    assert np.abs(fp16 - fp32).max() > 1e-4  # the float16 blocks do change pixels: the check below can tell
    session = ort.InferenceSession(f"{folder}/generator.onnx", providers=["CPUExecutionProvider"])
    (images,) = session.run(None, {"z": seed_latents(seeds, 32).numpy(), "truncation_psi": np.array(1.0, np.float32)})
    assert np.abs(images - fp32).max() < 1e-4


def test_class_index_input_and_uint8_nhwc_output(tmp_path: Path) -> None:
    folder = _export(tmp_path / "export", c_dim=3)
    meta = export_generator(folder, folder, ["onnx"], uint8=True)
    assert meta.formats["onnx"]["verified"]["max_abs_diff"] <= 1  # levels
    session = ort.InferenceSession(f"{folder}/generator.onnx", providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z", "class_index", "truncation_psi"]
    seeds, classes = [0, 1, 2, 3], np.array([2, 0, 1, 2], np.int64)  # a different class per row in one batch
    feeds = {"z": seed_latents(seeds, 32).numpy(), "class_index": classes, "truncation_psi": np.array(0.6, np.float32)}
    (images,) = session.run(None, feeds)
    assert images.dtype == np.uint8 and images.shape == (4, 32, 32, 3)
    for row, (seed, c) in enumerate(zip(seeds, classes, strict=True)):
        eager = _eager(folder, [seed], 0.6, int(c))[0].transpose(1, 2, 0)
        expected = np.clip(eager * 127.5 + 128, 0, 255).astype(np.uint8)
        assert np.abs(images[row].astype(int) - expected.astype(int)).max() <= 1


def test_export_from_a_run_and_generate_with_onnxruntime(make_config, tmp_path: Path, capsys) -> None:
    from pipeline.train import train

    cfg = make_config("train.total_kimg=0.016")
    train(cfg)
    out = tmp_path / "export"
    assert main(["export", cfg.run_dir, "--out", str(out), "--format", "safetensors,onnx,pt2"]) == 0
    assert re.search(
        r"onnx: generator.onnx \(max \|diff\| to PyTorch [0-9.e-]+, batch sizes 4 and 1", capsys.readouterr().out
    )
    grids = {}
    for runtime in ("torch", "onnxruntime"):
        grids[runtime] = tmp_path / f"{runtime}.png"
        argv = ["generate", str(out), "--runtime", runtime, "--seeds", "0-5", "--trunc", "0.7", "--out"]
        assert main([*argv, str(grids[runtime])]) == 0
    a, b = (np.asarray(Image.open(grids[r]), dtype=int) for r in ("torch", "onnxruntime"))
    assert np.abs(a - b).max() <= 1  # the same images, to a level of rounding
    capsys.readouterr()
    assert main(["generate", str(out), "--runtime", "onnxruntime", "--noise-mode", "random", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--noise-mode: invalid choice: 'random' (choose from 'const')" in err, err
    assert main(["generate", str(out), "--runtime", "onnxruntime", "--device", "cpu", "--out", "x.png"]) == 2
    assert "--device is not available with --runtime onnxruntime: it runs on the CPU here" in capsys.readouterr().err


def test_class_truncation_needs_the_global_center_with_onnxruntime(tmp_path: Path, capsys) -> None:
    # The torch sampler truncates toward the class's average w by default; the graph holds only the global w_avg.
    folder = _export(tmp_path / "export", c_dim=3)
    export_generator(folder, folder, ["onnx"])
    argv = ["generate", folder, "--seeds", "0-3", "--class", "1", "--trunc", "0.5", "--out"]
    assert main([*argv, str(tmp_path / "x.png"), "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --trunc-center global (as the graph does) or use --runtime torch" in err
    grids = {}
    for runtime in ("torch", "onnxruntime"):
        grids[runtime] = tmp_path / f"{runtime}.png"
        assert main([*argv, str(grids[runtime]), "--trunc-center", "global", "--runtime", runtime]) == 0
    a, b = (np.asarray(Image.open(grids[r]), dtype=int) for r in ("torch", "onnxruntime"))
    assert np.abs(a - b).max() <= 1
    assert main([*argv, str(tmp_path / "class.png"), "--runtime", "torch"]) == 0  # the class center: other images
    assert np.abs(np.asarray(Image.open(tmp_path / "class.png"), dtype=int) - a).max() > 10


def test_formats_are_added_later_and_dropped_with_new_weights(tmp_path: Path) -> None:
    folder = _export(tmp_path / "export")
    weights = hashlib.sha256(Path(folder, "generator.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ExportError, match="holds no onnx graph: add one with `ganpipe export"):
        open_graph_sampler(folder)
    export_generator(folder, folder, ["onnx"])  # derived from the folder's own weights, which stay as they are
    assert hashlib.sha256(Path(folder, "generator.safetensors").read_bytes()).hexdigest() == weights
    record = json.loads(Path(folder, "generator.json").read_text())["formats"]["onnx"]
    digest = hashlib.sha256(Path(folder, "generator.onnx").read_bytes()).hexdigest()
    assert record["graphs"]["generator"]["sha256"] == {"generator.onnx": digest}
    _export(tmp_path / "export", c_dim=0)  # new weights into the folder: the old program goes
    assert not Path(folder, "generator.onnx").exists()
    assert json.loads(Path(folder, "generator.json").read_text())["formats"] == {}


def test_a_program_beyond_tolerance_is_not_written(tmp_path: Path) -> None:
    folder = _export(tmp_path / "export")
    with pytest.raises(ExportError, match=r"the onnx program differs from PyTorch by up to [0-9.e-]+ \(tolerance 0\)"):
        export_generator(folder, folder, ["onnx"], tolerance=0.0)
    assert not Path(folder, "generator.onnx").exists()
    assert json.loads(Path(folder, "generator.json").read_text())["formats"] == {}


def test_a_changed_onnx_file_is_refused_in_one_line(unconditional: str, tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    folder.mkdir()
    for name in ("generator.json", "generator.safetensors"):
        (folder / name).write_bytes(Path(unconditional, name).read_bytes())
    model = onnx.load(f"{unconditional}/generator.onnx")
    for node in model.graph.node:  # rename the latent input everywhere it is used
        node.input[:] = ["latent" if name == "z" else name for name in node.input]
    model.graph.input[0].name = "latent"
    onnx.save(model, str(folder / "generator.onnx"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "generate", str(folder), "--runtime", "onnxruntime", "--out", "x.png"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        "ganpipe: error: generator.onnx has inputs latent (float32, [batch, 32]), truncation_psi (float32, []) but "
        "generator.json records z (float32, [batch, 32]), truncation_psi (float32, []): the file was changed after "
        "export"
    )


def test_a_replaced_or_missing_onnx_file_is_refused_in_one_line(unconditional: str, tmp_path: Path) -> None:
    folder = tmp_path / "replaced"
    folder.mkdir()
    for name in ("generator.json", "generator.safetensors", "generator.onnx"):
        (folder / name).write_bytes(Path(unconditional, name).read_bytes())
    model = onnx.load(str(folder / "generator.onnx"))
    model.producer_name = "someone else"  # same interface, other bytes
    onnx.save(model, str(folder / "generator.onnx"))
    with pytest.raises(ExportError, match=r"^generator.onnx is not the file exported \(its sha256 differs"):
        open_graph_sampler(str(folder))
    # A remote folder whose recorded file is gone: one line naming it, not a traceback.
    remote = "memory://graphs-missing"
    for name in ("generator.json", "generator.safetensors"):
        with fsspec.open(f"{remote}/{name}", "wb") as fh:
            fh.write(Path(unconditional, name).read_bytes())
    with pytest.raises(ExportError, match=r"^generator.onnx is recorded in memory://graphs-missing/generator.json"):
        open_graph_sampler(remote)


def test_the_readme_onnxruntime_example_runs_without_ganpipe(unconditional: str, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    (example,) = re.findall(r"```python\n(# onnxruntime alone.*?)```", readme, flags=re.S)
    assert len(example.strip().splitlines()) <= 20
    script = tmp_path / "example.py"
    script.write_text(example)
    # Run where ganpipe and torch cannot be imported: the example needs onnxruntime, numpy and Pillow only.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("torch", "pipeline"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is not available here')\n")
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(script), unconditional, "seed7.png"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(tmp_path / "seed7.png"), dtype=int)
    eager = _eager(unconditional, [7], 0.7)[0].transpose(1, 2, 0)
    assert np.abs(image - np.clip(eager * 127.5 + 128, 0, 255).astype(int)).max() <= 1
