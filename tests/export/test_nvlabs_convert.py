"""`ganpipe convert nvlabs`: NVIDIA-layout snapshot pickles convert without running their code, and the converted
generator and discriminator reproduce NVIDIA's outputs (the committed fixture's expected values)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.errors import ExportError
from pipeline.export import convert, load_generator, open_networks
from pipeline.export.converters.nvlabs import ConvertError, convert_nvlabs, read_nvlabs_pickle
from tests.export.nvlabs_pickle import Persistent, fixture_snapshot, nvlabs_modules


@pytest.mark.parametrize("tag", ["skip_resnet", "resnet_skip", "orig_orig"])
def test_converted_networks_reproduce_nvlabs_outputs(tag: str, tmp_path: Path) -> None:
    pkl, expected = fixture_snapshot(tag, tmp_path)
    out = tmp_path / "converted"
    meta, _ = convert("nvlabs", str(pkl), str(out), with_discriminator=True)
    assert meta.networks == ["G_ema", "D", "G"] and meta.resolution == 16
    assert meta.conditioning == {"kind": "class", "num_classes": 3, "encoding": "onehot"}
    assert meta.model["mapping"]["num_layers"] == 2 and meta.model["synthesis"]["conv_clamp"] == 256
    assert meta.model["synthesis"]["architecture"] == tag.split("_")[0]
    assert meta.model["discriminator"]["architecture"] == tag.split("_")[1]
    assert sorted(p.name for p in out.iterdir()) == [
        "discriminator.safetensors",
        "generator.json",
        "generator.safetensors",
        "generator_train.safetensors",
    ]

    G = load_generator(str(out))
    z, c = expected["z"], expected["c"]
    with torch.no_grad():
        for psi in ("1", "0.7"):
            ours = G(z, c, truncation_psi=float(psi), noise_mode="const")
            torch.testing.assert_close(ours, expected[f"G_out_psi{psi}"], rtol=1e-4, atol=1e-5)
    nets = open_networks(str(out), training=True)
    with torch.no_grad():
        torch.testing.assert_close(nets.build("D").eval()(expected["real"], c), expected["D_out"], rtol=1e-4, atol=1e-5)
    g_bias = nets.build("G").state_dict()["mapping.fc0.bias"]
    torch.testing.assert_close(g_bias, expected["G/mapping.fc0.bias"] + 0.5)


def test_protocol_3_snapshot_and_generator_only(tmp_path: Path) -> None:
    """Python 3.7-era pickles (protocol 3: sets via builtins.set) convert too; without --discriminator only G_ema
    is written."""
    pkl, expected = fixture_snapshot("skip_resnet", tmp_path, protocol=3)
    out = tmp_path / "g_only"
    meta, _ = convert("nvlabs", str(pkl), str(out))
    assert meta.networks == ["G_ema"] and meta.kimg == 120.0
    assert sorted(p.name for p in out.iterdir()) == ["generator.json", "generator.safetensors"]
    with torch.no_grad():
        ours = load_generator(str(out))(expected["z"], expected["c"], truncation_psi=0.7, noise_mode="const")
    torch.testing.assert_close(ours, expected["G_out_psi0.7"], rtol=1e-4, atol=1e-5)


def test_fixture_pickle_cannot_be_loaded_the_unsafe_way(tmp_path: Path) -> None:
    """Sanity check of the fixture: plain pickle.load would call NVIDIA's reconstructor; ours never does."""
    pkl, _ = fixture_snapshot("orig_orig", tmp_path)
    with nvlabs_modules(), pytest.raises(AssertionError, match="restricted unpickler"):
        pickle.loads(pkl.read_bytes())
    snapshot = read_nvlabs_pickle(str(pkl))
    assert snapshot["G_ema"].class_name == "Generator" and snapshot["G_ema"].module_src_chars > 0
    assert snapshot["training_set_kwargs"]["resolution"] == 16


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_code_in_a_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"G_ema": _Exploit(marker), "D": None}))
    with pytest.raises(ConvertError, match=r"names posix\.system, which is not on the converter's allow-list"):
        read_nvlabs_pickle(str(bad))
    assert not marker.exists()
    bad.write_bytes(pickle.dumps({"training_set_kwargs": [_EvalExploit()]}))
    with pytest.raises(ConvertError, match=r"builtins\.eval"):
        convert_nvlabs(str(bad))
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(ConvertError, match="not a readable pickle"):
        read_nvlabs_pickle(str(bad))
    bad.write_bytes(pickle.dumps({"G": 1}))
    with pytest.raises(ConvertError, match="not an NVIDIA network snapshot"):
        read_nvlabs_pickle(str(bad))


def test_cli_convert(tmp_path: Path, capsys) -> None:
    pkl, _ = fixture_snapshot("skip_resnet", tmp_path)
    out = tmp_path / "conv"
    assert main(["convert", "nvlabs", str(pkl), "--out", str(out), "--discriminator"]) == 0
    assert "converted 16px stylegan2 networks (G_ema, D, G)" in capsys.readouterr().out
    assert (out / "discriminator.safetensors").exists()
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_Exploit(tmp_path / "pwned")))
    assert main(["convert", "nvlabs", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "posix.system" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x").exists()


def test_unsupported_and_incomplete_snapshots_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "tf.pkl"
    bad.write_bytes(b"cdnnlib.tflib.network\nNetwork\n)R.")  # how a TensorFlow-era pickle names its networks
    with pytest.raises(ConvertError, match=r"dnnlib\.tflib\.network\.Network, .*TensorFlow-era pickle"):
        read_nvlabs_pickle(str(bad))

    empty = {"_parameters": {}, "_buffers": {}}
    with nvlabs_modules():
        synthesis = Persistent("SynthesisNetwork", {**empty, "_modules": {"input": Persistent("SynthesisInput", {})}})
        mapping = Persistent("MappingNetwork", {**empty, "_modules": {}})
        sg3 = Persistent("Generator", {**empty, "_modules": {"synthesis": synthesis, "mapping": mapping}})
        bad.write_bytes(pickle.dumps({"G_ema": sg3, "G": sg3}))  # a StyleGAN3 layout without its arguments
    with pytest.raises(ConvertError, match="StyleGAN3 \\(alias-free\\) generator"):
        convert_nvlabs(str(bad))

    pkl, _ = fixture_snapshot("orig_orig", tmp_path, drop=("D",))
    with pytest.raises(ConvertError, match="has no discriminator 'D'"):
        convert_nvlabs(str(pkl), discriminator="required")
    with pytest.raises(ExportError, match="no discriminator to convert .*has no discriminator 'D'"):
        convert("nvlabs", str(pkl), str(tmp_path / "no_d"), with_discriminator=True)
    meta, notes = convert("nvlabs", str(pkl), str(tmp_path / "no_d"))
    assert meta.networks == ["G_ema"] and any("D not converted" in n for n in notes)
