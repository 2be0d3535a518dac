"""Official BigGAN weights -> ganpipe's BigGAN family, without running any code of theirs.

`hf-biggan`: the public BigGAN-deep 128/256/512 release in pytorch-pretrained-BigGAN's layout (DeepMind's TF-Hub
    modules converted by Hugging Face): a folder with `pytorch_model.bin` and `config.json`, or the `.bin` file
    itself (its config beside it as `config.json` or `<name>-config.json`, as the release's URLs are named). It
    holds G only. What the converter handles:
    - spectral norm as `torch.nn.utils.spectral_norm` stores it (`weight_orig`, `weight_u`, `weight_v`): our
      eval-mode sigma `sv0` is set to u . (W v), exactly what that implementation divides by in eval mode;
    - the conditioning vector is [z, class embedding] there and [class embedding, z] here: the input columns of
      `gen_z` and of every BN's scale/offset are swapped;
    - `gen_z`'s output is reshaped as NHWC there and NCHW here: its rows are permuted;
    - the class embedding is a bias-free Linear on one-hot vectors there, an Embedding here (transposed);
    - the 51 per-truncation BN statistics become `truncation_means`/`truncation_vars` (`model.n_stats`), and the
      plain running statistics are the truncation-1 row;
    - `conv_to_rgb` has as many outputs as channels and the release keeps the first 3: the first 3 rows are kept,
      with sigma of the whole matrix as `sv0` (a power iteration on the kept rows would change it: the converted
      release is for sampling, not training).
`biggan-pytorch`: a BigGAN-PyTorch weights folder (`G_ema.pth`, `G.pth`, `D.pth`, and `state_dict.pth` whose
    `config` gives the hyperparameters), BigGAN or BigGAN-deep. Names are ours already (the family follows
    BigGAN-PyTorch's) except the batch norms' `stored_mean`/`stored_var` and the output BN's `gain`/`bias`. Its
    eval-mode spectral norm re-estimates sigma from u0 with one power step that does not move u0: after loading,
    every layer's `sv0` is set that way (`ema_refresh`), so eval-mode outputs match.
Every file is read with `torch.load(weights_only=True)`; `state_dict.pth` additionally allows the activation
modules (`torch.nn.ReLU`) that BigGAN-PyTorch stores in its config, which are data, never run.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from pipeline.errors import ExportError, GanpipeError
from pipeline.export.sources import Converter, NetworkSource, register_converter
from pipeline.families import get_family
from pipeline.models.biggan import G_WIDTHS, refresh_spectral_norms
from pipeline.schema import section_dict

FAMILY = "biggan"


class ConvertError(ExportError):
    """A BigGAN checkpoint that cannot be read or does not fit ganpipe's BigGAN networks."""


def _load_tensors(url: str, extra_globals: list[Any] | None = None) -> Any:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ConvertError(f"{url!r} does not exist")
    with fs.open(path, "rb") as f:
        try:
            if extra_globals:
                with torch.serialization.safe_globals(extra_globals):
                    return torch.load(f, map_location="cpu", weights_only=True)
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of every kind: the file is not what it claims to be
            raise ConvertError(f"{url!r} cannot be read as a weights-only PyTorch file ({e})"[:400]) from None


def _build_and_load(model: dict[str, Any], resolution: int, name: str, state: dict[str, Tensor], url: str) -> nn.Module:
    family = get_family(FAMILY)
    try:
        spec = family.spec(model, resolution)
        net = family.build(name, spec)
    except GanpipeError as e:
        raise ConvertError(f"{url!r}: the network's hyperparameters are outside ganpipe's range ({e})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ConvertError(f"{url!r}: {name} does not fit ganpipe's BigGAN ({detail[:300]})") from None
    return net


def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# pytorch-pretrained-BigGAN (the public BigGAN-deep release)


def _hf_files(url: str) -> tuple[str, str]:
    """(weights, config) URLs of a release given as a folder or as its .bin file."""
    url = url.rstrip("/")
    if url.endswith(".bin"):
        folder, name = posixpath.split(url)
        prefix = name[: -len("pytorch_model.bin")] if name.endswith("pytorch_model.bin") else ""
        fs, _ = fsspec.core.url_to_fs(url)
        candidates = [posixpath.join(folder, f"{prefix}config.json"), posixpath.join(folder, "config.json")]
        for config in candidates:
            if fs.exists(fsspec.core.url_to_fs(config)[1]):
                return url, config
        raise ConvertError(f"no config beside {url!r}: expected {candidates[0]!r} (the release's config.json)")
    weights, config = posixpath.join(url, "pytorch_model.bin"), posixpath.join(url, "config.json")
    fs, path = fsspec.core.url_to_fs(config)
    if not fs.exists(path):
        raise ConvertError(f"{config!r} does not exist: put the release's config.json beside its pytorch_model.bin")
    return weights, config


def _claims_hf(url: str) -> bool:
    if url.rstrip("/").endswith("pytorch_model.bin"):
        return True
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path) and fs.exists(posixpath.join(path, "pytorch_model.bin"))


def hf_model_section(config: dict[str, Any], url: str) -> tuple[dict[str, Any], int]:
    """Our model section and resolution for a release config (layers checked against our BigGAN-deep tables)."""
    try:
        resolution, ch, z_dim = int(config["output_dim"]), int(config["channel_width"]), int(config["z_dim"])
        layers = [(bool(up), int(a), int(b)) for up, a, b in config["layers"]]
        position, n_stats = int(config["attention_layer_position"]), int(config["n_stats"])
        num_classes, eps = int(config["num_classes"]), float(config["eps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{url!r} is not a pytorch-pretrained-BigGAN config ({type(e).__name__}: {e})") from None
    if resolution not in G_WIDTHS:
        raise ConvertError(f"{url!r}: output_dim {resolution} is not a BigGAN resolution ({sorted(G_WIDTHS)})")
    widths = G_WIDTHS[resolution]
    expected = [(up, widths[i], widths[i + 1] if up else widths[i]) for i in range(len(widths) - 1) for up in (0, 1)]
    if [(bool(u), a, b) for u, a, b in expected] != layers:
        raise ConvertError(f"{url!r}: layers {layers} are not BigGAN-deep's two blocks per resolution")
    if position % 2 or not 2 <= position <= len(layers):
        raise ConvertError(f"{url!r}: attention_layer_position {position} is not after a resolution's last block")
    model = {
        "architecture": "deep",
        "ch": ch,
        "z_dim": z_dim,
        "shared_dim": z_dim,  # the release embeds classes in z_dim dimensions (its class_embed_dim is unused)
        "c_dim": num_classes,
        "depth": 2,
        "g_attention": [8 * 2 ** (position // 2 - 1)],
        "d_attention": [],
        "bn_eps": eps,
        "sn_eps": eps,
        "n_stats": n_stats,
    }
    return model, resolution


def _hf_sn(prefix: str, src: dict[str, Tensor], rows: slice | Tensor | None = None) -> dict[str, Tensor]:
    """weight/u0/sv0 (and bias) of one torch-spectral-norm layer; `rows` selects output rows (sigma of all)."""
    w, u, v = src[f"{prefix}.weight_orig"], src[f"{prefix}.weight_u"], src[f"{prefix}.weight_v"]
    sigma = torch.dot(u, w.reshape(w.shape[0], -1) @ v).reshape(1)
    out = {"weight": w, "u0": u[None], "sv0": sigma}
    if f"{prefix}.bias" in src:
        out["bias"] = src[f"{prefix}.bias"]
    if rows is not None:
        out = {k: (t[rows] if k in ("weight", "bias") else t[:, rows] if k == "u0" else t) for k, t in out.items()}
    return out


def _swap_zy(w: Tensor, z_dim: int) -> Tensor:
    """Input columns [z, y] -> [y, z]."""
    return torch.cat([w[:, z_dim:], w[:, :z_dim]], dim=1)


def convert_hf_state(src: dict[str, Tensor], model: dict[str, Any], resolution: int) -> dict[str, Tensor]:
    """The release's state dict as our G's (see the module docstring)."""
    z_dim, n_blocks = model["z_dim"], 2 * (len(G_WIDTHS[resolution]) - 1)
    # The release's attention is its own entry of `layers`, after the last block of the stage at its resolution.
    attention_after = 2 * (model["g_attention"][0] // 8).bit_length()
    out: dict[str, Tensor] = {"shared.weight": src["embeddings.weight"].t()}

    def put(prefix: str, tensors: dict[str, Tensor]) -> None:
        out.update({f"{prefix}.{k}": v for k, v in tensors.items()})

    def batch_norm(ours: str, theirs: str, conditional: bool) -> None:
        means, variances = src[f"{theirs}.running_means"], src[f"{theirs}.running_vars"]
        put(ours, {"truncation_means": means, "truncation_vars": variances})
        put(f"{ours}.bn", {"running_mean": means[-1], "running_var": variances[-1]})
        out[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
        if conditional:
            for ours_lin, theirs_lin in (("gain", "scale"), ("bias", "offset")):
                sn = _hf_sn(f"{theirs}.{theirs_lin}", src)
                sn["weight"] = _swap_zy(sn["weight"], z_dim)
                put(f"{ours}.{ours_lin}", sn)
        else:
            put(f"{ours}.bn", {"weight": src[f"{theirs}.weight"], "bias": src[f"{theirs}.bias"]})

    # gen_z: rows from NHWC (h, w, c) to NCHW (c, h, w), columns from [z, y] to [y, z].
    lin = _hf_sn("generator.gen_z", src)
    channels = lin["weight"].shape[0] // 16
    order = torch.arange(16 * channels).view(4, 4, channels).permute(2, 0, 1).reshape(-1)
    lin = {"weight": _swap_zy(lin["weight"][order], z_dim), "bias": lin["bias"][order], "u0": lin["u0"][:, order],
           "sv0": lin["sv0"]}  # fmt: skip
    put("linear", lin)
    for k in range(n_blocks + 1):
        theirs = f"generator.layers.{k}"
        if k == attention_after:
            att = f"blocks.{k - 1}.1"
            for ours_conv, theirs_conv in (("theta", "theta"), ("phi", "phi"), ("g", "g"), ("o", "o_conv")):
                put(f"{att}.{ours_conv}", _hf_sn(f"{theirs}.snconv1x1_{theirs_conv}", src))
            out[f"{att}.gamma"] = src[f"{theirs}.gamma"].reshape(())
            continue
        block = f"blocks.{k if k < attention_after else k - 1}.0"
        for i in range(4):
            batch_norm(f"{block}.bn{i + 1}", f"{theirs}.bn_{i}", conditional=True)
            put(f"{block}.conv{i + 1}", _hf_sn(f"{theirs}.conv_{i}", src))
    batch_norm("output_layer.0", "generator.bn", conditional=False)
    put("output_layer.2", _hf_sn("generator.conv_to_rgb", src, rows=slice(0, 3)))
    return out


def convert_hf_biggan(url: str) -> NetworkSource:
    weights_url, config_url = _hf_files(url)
    with fsspec.open(config_url, "r") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{config_url!r} is not JSON ({e})") from None
    model, resolution = hf_model_section(config, config_url)
    src = _load_tensors(weights_url)
    if not isinstance(src, dict):
        raise ConvertError(f"{weights_url!r} holds a {type(src).__name__}, not the release's state dict")
    try:
        state = convert_hf_state(src, model, resolution)
    except KeyError as e:
        raise ConvertError(f"{weights_url!r} lacks {e} of the BigGAN-deep release layout") from None
    G = _build_and_load(model, resolution, "G_ema", state, weights_url)
    spec_model = section_dict(get_family(FAMILY).spec(model, resolution).model)
    notes = [
        f"z is T * truncnorm(-2, 2) with `ganpipe generate --trunc T` (T in (0, 1]); the release's BN statistics "
        f"for T are used ({model['n_stats']} rows)",
        "for sampling and evaluation: the release has no discriminator, and its per-truncation statistics are "
        "not trained (init= does not take it)",
    ]
    return NetworkSource(url, FAMILY, spec_model, resolution, {"G_ema": _state(G)}, None, notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# BigGAN-PyTorch


def _claims_biggan_pytorch(url: str) -> bool:
    if url.rstrip("/").endswith("G_ema.pth"):
        return True
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path) and fs.exists(posixpath.join(path, "G_ema.pth"))


def biggan_pytorch_model_section(config: dict[str, Any], url: str) -> tuple[dict[str, Any], int]:
    """Our model section and resolution for BigGAN-PyTorch's `config` (what its train.py parsed)."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConvertError(f"{url!r}: {what} is not supported (ganpipe's BigGAN has BigGAN-PyTorch's defaults)")

    try:
        arch = {"BigGAN": "biggan", "BigGANdeep": "deep"}.get(str(config["model"]))
        need(arch is not None, f"model {config['model']!r}")
        need(bool(config["G_shared"]), "G_shared=False (per-layer class embeddings)")
        need(config["G_param"] == "SN" and config["D_param"] == "SN", "G_param/D_param other than SN")
        need(int(config["num_G_SVs"]) == 1 and int(config["num_D_SVs"]) == 1, "more than one singular vector")
        need(config.get("norm_style", "bn") == "bn", f"norm_style {config.get('norm_style')!r}")
        need(config.get("G_nl", "relu") in ("relu", "inplace_relu"), f"G_nl {config.get('G_nl')!r}")
        need(config.get("D_nl", "relu") in ("relu", "inplace_relu"), f"D_nl {config.get('D_nl')!r}")
        need(bool(config.get("D_wide", True)), "D_wide=False")
        need(int(config["G_depth"]) == int(config["D_depth"]), "different G_depth and D_depth")
        need(int(config["num_G_SV_itrs"]) == int(config["num_D_SV_itrs"]), "different G and D power iterations")
        z_dim = int(config["dim_z"])
        shared_dim = int(config["shared_dim"]) or z_dim  # 0 means dim_z in BigGAN-PyTorch

        def attention(value: Any) -> list[int]:
            return [int(r) for r in str(value).split("_") if int(r) > 0]

        model = {
            "architecture": arch,
            "ch": int(config["G_ch"]),
            "d_ch": int(config["D_ch"]),
            "z_dim": z_dim,
            "shared_dim": shared_dim,
            "c_dim": int(config["n_classes"]),
            "hier": bool(config["hier"]),
            "depth": int(config["G_depth"]),
            "g_attention": attention(config["G_attn"]),
            "d_attention": attention(config["D_attn"]),
            "bn_eps": float(config["BN_eps"]),
            "sn_eps": float(config["SN_eps"]),
            "sn_itrs": int(config["num_G_SV_itrs"]),
            "init": "N02" if config.get("G_init") == "N02" else "ortho",
        }
        resolution = int(config["resolution"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{url!r}: its config lacks or garbles {e} (BigGAN-PyTorch's state_dict.pth)") from None
    if arch == "biggan" and model["hier"]:
        slots = len(G_WIDTHS.get(resolution, ())) or 1
        model["z_dim"] = z_dim // slots * slots  # BigGAN-PyTorch drops the remainder of an uneven split too
    return model, resolution


def _rename_biggan_pytorch(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if key in ("output_layer.0.gain", "output_layer.0.bias"):
            out[f"output_layer.0.bn.{'weight' if leaf == 'gain' else 'bias'}"] = value
        elif leaf in ("stored_mean", "stored_var"):
            out[f"{prefix}.bn.running_{leaf[len('stored_') :]}"] = value
            out.setdefault(f"{prefix}.bn.num_batches_tracked", torch.tensor(0))
        else:
            out[key] = value
    return out


def _config_dir(url: str) -> str:
    url = url.rstrip("/")
    return posixpath.dirname(url) if url.endswith(".pth") else url


def convert_biggan_pytorch(url: str, training: bool = False) -> NetworkSource:
    folder = _config_dir(url)
    meta_url = posixpath.join(folder, "state_dict.pth")
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(posixpath.join(path, "state_dict.pth")):
        raise ConvertError(
            f"{meta_url!r} does not exist: BigGAN-PyTorch's train.py writes it beside G_ema.pth (it holds the "
            "hyperparameters); copy it from the run's weights folder"
        )
    meta = _load_tensors(meta_url, [nn.ReLU])
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ConvertError(f"{meta_url!r} has no 'config' dict (BigGAN-PyTorch writes one)")
    model, resolution = biggan_pytorch_model_section(meta["config"], folder)
    names = {"G_ema": "G_ema.pth", **({"G": "G.pth", "D": "D.pth"} if training else {})}
    states: dict[str, dict[str, Tensor]] = {}
    for name, file in names.items():
        if name != "G_ema" and not fs.exists(posixpath.join(path, file)):
            continue
        url_of_file = posixpath.join(folder, file)
        state = _load_tensors(url_of_file)
        if not isinstance(state, dict):
            raise ConvertError(f"{url_of_file!r} holds a {type(state).__name__}, not a BigGAN-PyTorch state dict")
        net = _build_and_load(model, resolution, name, _rename_biggan_pytorch(state), folder)
        refresh_spectral_norms(net)  # sigma as BigGAN-PyTorch's eval-mode layers estimate it
        states[name] = _state(net)
    spec_model = section_dict(get_family(FAMILY).spec(model, resolution).model)
    itr = meta.get("itr")
    notes = [f"BigGAN-PyTorch iteration {itr}"] if isinstance(itr, int) else []
    return NetworkSource(url, FAMILY, spec_model, resolution, states, None, notes=notes)


HF_BIGGAN = register_converter(
    Converter(
        name="hf-biggan",
        help="the public BigGAN-deep 128/256/512 release (pytorch-pretrained-BigGAN: pytorch_model.bin + config.json)",
        claims=_claims_hf,
        read=lambda url, training: convert_hf_biggan(url),
    )
)
BIGGAN_PYTORCH = register_converter(
    Converter(
        name="biggan-pytorch",
        help="a BigGAN-PyTorch weights folder (G_ema.pth, G.pth, D.pth, state_dict.pth; BigGAN or BigGAN-deep)",
        claims=_claims_biggan_pytorch,
        read=convert_biggan_pytorch,
    )
)

__all__ = [
    "BIGGAN_PYTORCH",
    "HF_BIGGAN",
    "ConvertError",
    "biggan_pytorch_model_section",
    "convert_biggan_pytorch",
    "convert_hf_biggan",
    "convert_hf_state",
    "hf_model_section",
]
