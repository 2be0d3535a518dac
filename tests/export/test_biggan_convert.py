"""`ganpipe convert hf-biggan` and `ganpipe convert biggan-pytorch`: the converted networks reproduce the reference
implementations' own outputs, stored in tests/models/fixtures by tools/fixtures/make_biggan_fixtures.py (which
ran pytorch-pretrained-BigGAN's and BigGAN-PyTorch's code on small seeded networks; none of it is in ganpipe)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from pipeline.cli import main
from pipeline.export import convert, load_generator, load_sampler, open_networks
from pipeline.export.converters.biggan import ConvertError
from pipeline.models.biggan_sampling import BigGANOptions, truncated_latents
from pipeline.models.conditioning import Request
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "models" / "fixtures"


def _fixture(name: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def hf_release(resolution: int, folder: Path, bin_name: str = "pytorch_model.bin",
               config_name: str = "config.json") -> dict[str, torch.Tensor]:  # fmt: skip
    """The fixture as the release lays it out (the weights file as torch.save wrote it); returns its io tensors."""
    meta, tensors = _fixture(f"hf_biggan_deep_small_{resolution}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_prefixed(tensors, "G."), folder / bin_name)
    (folder / config_name).write_text(meta["config"])
    return _prefixed(tensors, "io.")


def biggan_pytorch_folder(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """A BigGAN-PyTorch weights folder: its .pth state dicts and state_dict.pth with the config as train.py keeps
    it (activation modules included)."""
    meta, tensors = _fixture(name)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_prefixed(tensors, "G."), folder / "G_ema.pth")
    torch.save(_prefixed(tensors, "G."), folder / "G.pth")
    torch.save(_prefixed(tensors, "D."), folder / "D.pth")
    config: dict[str, Any] = json.loads(meta["config"])
    config["G_activation"] = config["D_activation"] = nn.ReLU(inplace=False)
    torch.save({"itr": 1234, "epoch": 1, "config": config}, folder / "state_dict.pth")
    return _prefixed(tensors, "io.")


@pytest.mark.parametrize("resolution", [128, 256])
def test_hf_release_reproduces_the_reference_images_at_every_truncation(resolution: int, tmp_path: Path) -> None:
    io = hf_release(resolution, tmp_path / "release")
    nets = open_networks(str(tmp_path / "release"))  # claimed by the hf-biggan converter
    assert nets.family == "biggan" and nets.resolution == resolution and nets.model["n_stats"] == 51
    G = nets.build("G_ema").eval()
    truncations = sorted({k.split("_")[1] for k in io if k.startswith("img_")})
    assert {"1.0", "0.4"} <= set(truncations)
    with torch.no_grad():
        for t in truncations:
            ours = G(io[f"z_{t}"], io[f"class_{t}"].argmax(1), truncation=float(t))
            assert (ours - io[f"img_{t}"]).abs().max() < 1e-4, t


def test_hf_release_by_its_file_urls_and_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The release's own file names (`biggan-deep-128-pytorch_model.bin` beside `biggan-deep-128-config.json`),
    `ganpipe convert`, then `ganpipe generate --class --trunc` draws what G gives for the seeds' truncated z."""
    hf_release(128, tmp_path / "s3", "biggan-deep-128-pytorch_model.bin", "biggan-deep-128-config.json")
    out = tmp_path / "export"
    src = str(tmp_path / "s3" / "biggan-deep-128-pytorch_model.bin")
    assert main(["convert", "hf-biggan", src, "--out", str(out)]) == 0
    assert "truncnorm" in capsys.readouterr().out  # the converter's note on how to sample
    assert main(["generate", str(out), "--seeds", "3,4", "--class", "7", "--trunc", "0.4", "--outdir",
                 str(tmp_path / "png")]) == 0  # fmt: skip
    G = load_generator(str(out))
    z = truncated_latents(load_sampler(str(out)).latents([3, 4]), 0.4)
    with torch.no_grad():
        expected = G(z, torch.tensor([7, 7]), truncation=0.4)
    png = torch.from_numpy(np.array(Image.open(tmp_path / "png" / "seed0004.png")))
    ours = (expected[1].permute(1, 2, 0) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert (png.int() - ours.int()).abs().max() <= 1
    capsys.readouterr()
    assert main(["generate", str(out), "--seeds", "1", "--class", "7", "--trunc", "1.5", "--out", "x.png"]) != 0
    assert "--trunc 1.5 is invalid: give a truncation in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["biggan_pytorch_small", "biggan_pytorch_deep_small"])
def test_biggan_pytorch_weights_reproduce_its_outputs(name: str, tmp_path: Path) -> None:
    io = biggan_pytorch_folder(name, tmp_path / "weights")
    out = tmp_path / "export"
    meta, notes = convert("biggan-pytorch", str(tmp_path / "weights"), str(out), with_discriminator=True)
    assert meta.networks == ["G_ema", "D", "G"] and notes == ["BigGAN-PyTorch iteration 1234"]
    assert meta.model["architecture"] == ("deep" if "deep" in name else "biggan")
    nets = open_networks(str(out), training=True)  # what `init=` reads: G, D and G_ema
    G, D = nets.build("G_ema").eval(), nets.build("D").eval()
    with torch.no_grad():
        for t in ("1.0", "0.4"):
            assert (G(io[f"z_{t}"], io["y"]) - io[f"img_{t}"]).abs().max() < 1e-4, t
        assert (D(io["img_1.0"], io["y"]) - io["d_out_fake"]).abs().max() < 1e-4
        assert (D(io["d_x"], io["d_y"]) - io["d_out"]).abs().max() < 1e-4
    sampler = load_sampler(str(tmp_path / "weights"))  # the folder itself is a source too
    images = sampler.generate([0], Request(class_idx=2), BigGANOptions(truncation=0.5))
    assert images.shape == (1, 3, 128, 128)


class Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_bad_sources_are_one_line_errors_and_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "weights"
    biggan_pytorch_folder("biggan_pytorch_small", folder)
    (folder / "state_dict.pth").unlink()
    with pytest.raises(ConvertError, match=r"state_dict.pth' does not exist"):
        open_networks(str(folder))
    torch.save({"config": {"x": 1}}, folder / "state_dict.pth")
    with pytest.raises(ConvertError, match=r"its config lacks or garbles 'model'"):
        open_networks(str(folder))
    (folder / "state_dict.pth").write_bytes(pickle.dumps({"config": Payload()}, protocol=2))
    with pytest.raises(ConvertError, match="cannot be read as a weights-only PyTorch file"):
        open_networks(str(folder))
    assert "this must never run" not in capsys.readouterr().out
    release = tmp_path / "release"
    hf_release(128, release)
    config = json.loads((release / "config.json").read_text())
    config["layers"] = config["layers"][:-2]
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError, match="are not BigGAN-deep's two blocks per resolution"):
        open_networks(str(release))
    (release / "config.json").unlink()
    with pytest.raises(ConvertError, match="config.json' does not exist: put the release's config.json beside"):
        open_networks(str(release))


def test_init_fine_tunes_from_biggan_pytorch_weights(tmp_path: Path) -> None:
    """`init=` a BigGAN-PyTorch folder: a 10-class 128 px dataset, the recipe's model section set to the source's,
    one training step starting from its G, G_ema and D."""
    biggan_pytorch_folder("biggan_pytorch_small", tmp_path / "weights")
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in range(10):
        (images / f"class{cls}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(images / f"class{cls}" / "a.png")
    data = tmp_path / "shards"
    assert main(["data", "shards", str(images), "--out", str(data), "--layout", "classes", "--resolution", "128",
                 "--no-progress"]) == 0  # fmt: skip
    nets = open_networks(str(tmp_path / "weights"), training=True)
    model = [f"model.{k}={json.dumps(v)}" for k, v in nets.model.items() if k not in ("init",)]
    run = tmp_path / "run"
    code = main(["train", str(REPO / "recipes" / "biggan" / "tiny.yaml"), f"init={tmp_path / 'weights'}",
                 f"data.url={data}", "data.resolution=128", "data.batch_size=4", f"run_dir={run}",
                 "train.total_kimg=0.004", "eval.metrics=[]", "logger.csv=false", "train.progress_bar=false",
                 *model])  # fmt: skip
    assert code == 0
    from pipeline.checkpoint import list_checkpoints, load_checkpoint

    state = load_checkpoint(list_checkpoints(str(run))[-1])
    source = nets.states["D"]["linear.weight"]
    assert not torch.equal(state["D"]["linear.weight"], source)  # D trained one step from the source's weights
    torch.testing.assert_close(state["D"]["linear.weight"], source, atol=1e-3, rtol=0)
