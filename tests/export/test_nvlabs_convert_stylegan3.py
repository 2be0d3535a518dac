"""`ganpipe convert nvlabs` for NVIDIA StyleGAN3 snapshots (`--cfg=stylegan3-t` / `-r`): they convert to the
`stylegan3` family without running their code, and the converted generator reproduces NVIDIA's outputs.

Two kinds of snapshot: pickles laid out like NVIDIA's, built by our code from the committed NVIDIA fixtures
(tests/export/nvlabs3_pickle.py; fast, run everywhere), and real ones NVIDIA's own code pickles in a subprocess
(tools/fixtures/make_nvlabs_stylegan3_snapshot.py), when a checkout of NVlabs/stylegan3 is available
(`GANPIPE_NVLABS_STYLEGAN3_CHECKOUT`, else a clone of the local mirror; otherwise that test skips and says why)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.config import config_from_dict
from pipeline.export import convert, load_generator, open_networks
from pipeline.export.converters.nvlabs import ConvertError, convert_nvlabs, read_nvlabs_pickle
from pipeline.train.task import GANTask
from pipeline.train.transfer import init_networks
from tests.export.nvlabs3_pickle import (
    Fixture,
    nvidia_snapshot,
    nvlabs_stylegan3_checkout,
    persistent_at,
    stylegan3_snapshot,
)
from tests.export.nvlabs_pickle import nvlabs_modules

CASES = [("t", 16), ("t", 32), ("r", 16), ("r", 32)]
SNAPSHOT = "network-snapshot-000040.pkl"  # NVIDIA's name: the kimg the snapshot was taken at
TOL = 1e-4  # the brief's limit on |ours - NVIDIA's|; measured diffs are ~1e-7


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny networks on shared cores (tests/conftest.py)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def check_outputs(G: torch.nn.Module, fx: Fixture) -> float:
    """The largest |G - NVIDIA| over psi 1 and 0.7 on the fixture's inputs (asserted below TOL)."""
    worst = 0.0
    with torch.no_grad():
        for psi in ("1", "0.7"):
            ours = G(fx.tensors["z"], fx.tensors.get("c"), truncation_psi=float(psi))
            worst = max(worst, max_diff(ours, fx.tensors[f"G_out_psi{psi}"]))
    assert worst < TOL, f"{fx.tag} {fx.resolution}px: max |ours - NVIDIA| = {worst:.3g}"
    return worst


def check_model(model: dict[str, Any], fx: Fixture) -> None:
    """The converted model section is the fixture's configuration."""
    m, s = fx.meta, model["synthesis"]
    assert (model["z_dim"], model["w_dim"], model["c_dim"]) == (m["z_dim"], m["w_dim"], m["c_dim"])
    assert model["mapping"] == {"num_layers": m["map_layers"], "lr_multiplier": 0.01, "w_avg_beta": 0.998}
    for key in ("conv_kernel", "use_radial_filters", "channel_base", "channel_max", "conv_clamp", "num_fp16_res"):
        assert s[key] == m[key], key
    r = fx.tag == "r"
    d = model["discriminator"]
    assert (d["channel_base"], d["channel_max"]) == (m["channel_base"] // (1 + r), m["channel_max"] // (1 + r))


@pytest.mark.parametrize(("tag", "resolution"), CASES)
def test_converted_stylegan3_reproduces_nvlabs_outputs(tag: str, resolution: int, tmp_path: Path) -> None:
    pkl, fx = stylegan3_snapshot(tag, resolution, tmp_path / SNAPSHOT)
    out = tmp_path / "converted"
    meta, notes = convert("nvlabs", str(pkl), str(out), with_discriminator=True)
    assert meta.family == "stylegan3" and meta.resolution == resolution and meta.kimg == 40.0
    assert meta.networks == ["G_ema", "D", "G"]
    assert any("magnitude_ema_beta=0.5" in n for n in notes)
    check_model(meta.model, fx)
    nets = open_networks(str(out), training=True)
    transform = nets.states["G_ema"]["synthesis.input.transform"]
    assert not torch.equal(transform, torch.eye(3))  # NVIDIA's non-identity input transform came along...
    torch.testing.assert_close(transform, fx.tensors["G/synthesis.input.transform"], rtol=0, atol=0)
    check_outputs(load_generator(str(out)), fx)  # ...and the outputs show it was used
    g_bias = nets.build("G").state_dict()["mapping.fc0.bias"]
    torch.testing.assert_close(g_bias, fx.tensors["G/mapping.fc0.bias"] + 0.5)  # the non-EMA G, not G_ema
    nets.build("D")  # strict load of the StyleGAN2 discriminator


@pytest.fixture(scope="module")
def nvlabs_stylegan3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nvlabs_stylegan3_checkout(tmp_path_factory.mktemp("nvlabs"))


@pytest.mark.parametrize(("tag", "resolution"), [("t", 16), ("r", 32)])
def test_real_nvidia_snapshot_converts(tag: str, resolution: int, nvlabs_stylegan3: Path, tmp_path: Path) -> None:
    """The strongest oracle: a snapshot pickled by NVIDIA's own code (its persistence embeds the source, its
    modules store numpy attributes) converts, and G_ema and D reproduce NVIDIA's outputs."""
    pkl, check = tmp_path / SNAPSHOT, tmp_path / "nvidia_outputs.safetensors"
    nvidia_snapshot(nvlabs_stylegan3, tag, resolution, pkl, check)
    snapshot = read_nvlabs_pickle(str(pkl))
    assert snapshot["G_ema"].module_src_chars > 10_000  # NVIDIA's networks_stylegan3.py, kept as a length only
    source = convert_nvlabs(str(pkl))
    assert source.family == "stylegan3" and sorted(source.states) == ["D", "G", "G_ema"]
    fx = stylegan3_snapshot(tag, resolution, tmp_path / "ours.pkl")[1]
    check_model(source.model, fx)
    check_outputs(source.build("G_ema").eval(), fx)
    nvidia = load_file(str(check))
    torch.testing.assert_close(nvidia["G_out_psi1"], fx.tensors["G_out_psi1"], rtol=0, atol=TOL)
    with torch.no_grad():
        d_out = source.build("D").eval()(nvidia["G_out_psi1"], nvidia.get("c"))
    assert max_diff(d_out, nvidia["D_out"]) < 1e-5 * max(1.0, nvidia["D_out"].abs().max().item())
    g_bias = source.states["G"]["mapping.fc0.bias"]
    torch.testing.assert_close(g_bias, source.states["G_ema"]["mapping.fc0.bias"] + 0.5)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_stylegan3_snapshot_is_refused_without_running_it(tmp_path: Path) -> None:
    """A callable hidden deep in a StyleGAN3 layer's state stops the load before anything runs; the fixture's
    `module_src` (`raise SystemExit(3)`) is never executed, and plain pickle.load would have run NVIDIA's hook."""
    marker = tmp_path / "pwned"

    def plant(snapshot: dict[str, Any]) -> None:
        persistent_at(snapshot["G_ema"], "synthesis.L2_36_25").meta["state"]["padding"] = _Exploit(marker)

    pkl, _ = stylegan3_snapshot("t", 16, tmp_path / SNAPSHOT, tweak=plant)
    with pytest.raises(ConvertError, match=r"names posix\.system, which is not on the converter's allow-list"):
        convert_nvlabs(str(pkl))
    assert not marker.exists()
    clean, _ = stylegan3_snapshot("r", 16, tmp_path / "clean" / SNAPSHOT)
    with nvlabs_modules(), pytest.raises(AssertionError, match="restricted unpickler"):
        pickle.loads(clean.read_bytes())
    assert read_nvlabs_pickle(str(clean))["G_ema"].module_src_chars > 0


def _set(path: str, key: str, value: Any):
    def tweak(snapshot: dict[str, Any]) -> None:
        for name in ("G", "G_ema"):
            obj = persistent_at(snapshot[name], path)
            if key == "class_name":
                obj.meta["class_name"] = value
            else:
                obj.meta["state"][key] = value

    return tweak


def _kwarg(key: str, value: Any):
    def edit(kwargs: dict[str, Any]) -> None:
        if "." in key:
            outer, inner = key.split(".")
            kwargs[outer] = {**kwargs[outer], inner: value}
        else:
            kwargs[key] = value

    return edit


REFUSALS = {
    "unknown Generator class": (
        {"tweak": _set("", "class_name", "GeneratorV4")},
        r"^'G_ema' is a GeneratorV4, a class the converter does not know: it reads NVIDIA's StyleGAN2 and StyleGAN3",
    ),
    "unknown layer class": (
        {"tweak": _set("synthesis.L3_36_23", "class_name", "SynthesisLayerV2")},
        r"^G_ema holds a SynthesisLayerV2 \(at synthesis\.L3_36_23\), a class the converter does not know",
    ),
    "unexpressible kwarg": (
        {"g_kwargs": _kwarg("fused_modconv_default", "inference_only")},
        r"^G's constructor argument fused_modconv_default='inference_only' has no counterpart in ganpipe's StyleGAN3",
    ),
    "unexpressible mapping kwarg": (
        {"g_kwargs": _kwarg("mapping_kwargs.embed_features", 8)},
        r"^G's mapping_kwargs\.embed_features=8 has no counterpart in ganpipe's StyleGAN3",
    ),
    "positional constructor args": (
        {"tweak": _set("", "_init_args", (16,))},
        r"^G was constructed with positional arguments",
    ),
    "kwargs that do not describe the stored network": (
        {"g_kwargs": _kwarg("output_scale", 0.5)},  # invisible to a strict load: only the design check sees it
        r"^G_ema\.synthesis\.output_scale is 0\.25 in the pickle, but ganpipe builds 0\.5 from its hyperparameters",
    ),
    "a value outside ganpipe's range": (
        {"g_kwargs": _kwarg("num_critical", 20)},
        r"^the network's hyperparameters are outside ganpipe's range \(model\.synthesis\.num_critical=20 is invalid",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_stylegan3_snapshots_that_do_not_fit_are_named_in_one_line(case: str, tmp_path: Path) -> None:
    edits, message = REFUSALS[case]
    pkl, _ = stylegan3_snapshot("t", 16, tmp_path / SNAPSHOT, **edits)
    with pytest.raises(ConvertError, match=message) as info:
        convert_nvlabs(str(pkl))
    assert "\n" not in str(info.value)


def test_cli_convert_then_generate_with_stylegan3_options(tmp_path: Path, capsys) -> None:
    """`ganpipe convert nvlabs` then `ganpipe generate` (also straight from the .pkl) with --translate/--rotate."""
    pkl, _ = stylegan3_snapshot("r", 16, tmp_path / SNAPSHOT)
    out = tmp_path / "conv"
    assert main(["convert", "nvlabs", str(pkl), "--out", str(out)]) == 0
    assert "converted 16px stylegan3 networks (G_ema)" in capsys.readouterr().out
    moved, direct = tmp_path / "moved.png", tmp_path / "direct.png"
    moves = ["--translate", "0.25,0", "--rotate", "10"]
    assert main(["generate", str(out), "--seeds", "0-1", "--out", str(moved), *moves]) == 0
    assert main(["generate", str(pkl), "--seeds", "0-1", "--out", str(direct)]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (moved, direct))
    assert a.shape == b.shape and 16 in a.shape[:2] and a.size == 2 * 16 * 16 * 3  # two 16px images
    assert np.abs(a - b).max() > 10  # the input transform moved the image


def test_training_from_a_stylegan3_snapshot_starts_from_its_weights(tmp_path: Path) -> None:
    """`family: stylegan3` with `init=SNAPSHOT.pkl`: the run's G, G_ema and D start as the pickle's (what
    `ganpipe train` does before its first step), with the magnitude EMA rate from the run's own batch size."""
    pkl, fx = stylegan3_snapshot("t", 16, tmp_path / SNAPSHOT)
    source = open_networks(str(pkl), training=True)
    data = {"resolution": 16, "batch_size": 4}
    cfg = config_from_dict({"family": "stylegan3", "model": source.model, "data": data, "init": str(pkl)})
    task = GANTask(cfg)
    init_networks(cfg.init, cfg.family, cfg.to_dict()["model"], cfg.data.resolution, task.G, task.G_ema, task.D)
    for name in ("G", "G_ema", "D"):
        ours = getattr(task, name).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in source.states[name].items()), name
    assert torch.equal(task.G_ema.state_dict()["mapping.fc0.bias"], fx.tensors["G/mapping.fc0.bias"])
    assert task.G.synthesis.layers()[0].magnitude_ema_beta == pytest.approx(0.5 ** (4 / 20_000))
    check_outputs(task.G_ema.eval(), fx)
