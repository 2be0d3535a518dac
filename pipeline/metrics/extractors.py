"""Feature extractors: the FID Inception-v3 and a small CPU extractor for fast tracking, loaded from weight files.

Job: turn uint8 images [N, C, H, W] into float32 features (and, for Inception, class logits for IS).

Inception-v3 ("inception" / `eval.inception_weights`)
    The architecture is torch-fidelity's port of the 2015-12-05 TF graph every published FID uses (the same
    network as NVIDIA's and clean-fid's pickles); we reuse its module rather than re-declare it. The weights
    are a PyTorch state dict or safetensors file at a local path or URL; a URL is copied once into
    `<cache>/weights/`. Loading never executes code from the file: it is read with `torch.load(weights_only=True)`
    (or safetensors) first, and torch-fidelity's constructor, which always loads with `weights_only=False`, is
    only ever handed bytes we re-serialised ourselves from those tensors.
    Features are the 2048-d pool3 activations; logits are pool3 @ fc.weight.T (no bias), as in OpenAI's original
    Inception Score code and torch-fidelity's `logits_unbiased`.

Resizing to 299x299 (`eval.resize`)
    clean (default): clean-fid's policy: each channel of the uint8 image is resized as float with PIL's
        antialiased bicubic filter, with no quantisation in between. We run torch's antialiased bicubic, which
        is the same algorithm, on the GPU (`clean_resize`; equal to PIL's `pil_clean_resize` to float rounding):
        PIL on the CPU would cap extraction at ~350-500 img/s even on an H100.
    legacy: TF1's bilinear resize without antialiasing (torch-fidelity's bit-exact port), which is what
        StyleGAN2-ADA's and torch-fidelity's published numbers used. Use it to compare with those.

Small extractor ("small")
    Four strided convolutions (3 -> 256 channels) on a 64x64 antialiased resize, global average pooled to 256-d.
    Its weights are a fixed seeded random initialisation (or `eval.small_weights`): random-network features
    track training progress cheaply on CPU, but its numbers are not comparable to any published FID.

Contract: `build_extractor(cfg, cache_dir)` returns a `FeatureExtractor` in eval mode whose `extractor_id`
identifies architecture, weights (sha256) and resize policy, so cached reference statistics can never be
reused with another extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
from collections.abc import Mapping
from unittest import mock

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.metrics.config import EvalConfig

INCEPTION_SIZE = 299


class FeatureExtractor(nn.Module):
    """uint8 [N, C, H, W] -> {"features": float32 [N, dim], "logits": float32 [N, classes] (if has_logits)}."""

    extractor_id: str
    dim: int
    has_logits: bool

    def forward(self, images: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def _to_rgb(images: Tensor) -> Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    c = images.shape[1]
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    if c == 4:
        return images[:, :3]
    if c != 3:
        raise ValueError(f"images have {c} channels; expected 1, 3 or 4")
    return images


def pil_clean_resize(images: Tensor, size: int) -> Tensor:
    """clean-fid's reference resize: PIL bicubic per channel on float32 values (mode 'F'), no quantisation.
    Slow (one CPU core, ~350 img/s at 256 -> 299); `clean_resize` computes the same on any device."""
    arr = images.cpu().numpy()
    out = np.empty((*arr.shape[:2], size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for ch in range(arr.shape[1]):
            img = Image.fromarray(arr[i, ch].astype(np.float32), mode="F")
            out[i, ch] = np.asarray(img.resize((size, size), resample=Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(out).to(images.device)


def clean_resize(images: Tensor, size: int) -> Tensor:
    """clean-fid's resize on the images' own device: torch's antialiased bicubic is PIL's algorithm (same a=-0.5
    kernel, same support scaling), so it equals `pil_clean_resize` up to float32 rounding (max |diff| < 0.004 on
    the 0..255 scale from 16 to 1024 px; checked by the tests) at GPU speed."""
    x = images.float()
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


# ------------------------------------------------------------------------------------------------------------
# Weight files


def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def read_weight_bytes(src: str, cache_dir: str, key: str) -> bytes:
    """The bytes of a weight file at a local path, or at a URL copied once into `<cache_dir>/weights/`."""
    if _is_url(src):
        local = os.path.join(cache_dir, "weights", os.path.basename(src.split("?")[0]) or "weights.pt")
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            try:
                with fsspec.open(src, "rb") as fh:
                    data = fh.read()
            except Exception as e:  # fsspec raises per-protocol types (ClientError, HTTPError, OSError, ...)
                raise ConfigError(
                    f"{key}={src!r} cannot be downloaded ({type(e).__name__}): copy the file to a local path "
                    f"and set {key}=PATH"
                ) from None
            tmp = f"{local}.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, local)  # a killed download never leaves a half file under the cached name
        src = local
    try:
        with fsspec.open(src, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{key}={src!r} does not exist: give the path or URL of the weight file") from None


def load_state_dict_bytes(data: bytes, key: str, src: str) -> dict[str, Tensor]:
    """A state dict from safetensors or `torch.save` bytes, never unpickling anything but tensors."""
    try:
        if data[:1] != b"PK" and data[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch / safetensors raise several types for foreign or corrupt files
        raise ConfigError(
            f"{key}={src!r} is not a readable state dict ({type(e).__name__}): give a .pth/.pt/.safetensors file"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{key}={src!r} does not hold a flat state dict of tensors: re-export the weights")
    return dict(state)


def _sha(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------
# Inception-v3


def _inception_module(state: Mapping[str, Tensor] | None) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buffer = io.BytesIO()
    torch.save(dict(state or {}), buffer)  # our own serialisation of plain tensors: safe for its torch.load
    buffer.seek(0)
    patch: contextlib.AbstractContextManager = contextlib.nullcontext()
    if state is None:
        # torch-fidelity's constructor always loads weights; for a randomly initialised network (tests, benchmark)
        # skip that load and keep PyTorch's default initialisation.
        patch = mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
    with patch:
        net = FeatureExtractorInceptionV3("ganpipe-inception-v3", ["2048"], feature_extractor_weights_path=buffer)
    return net


def random_inception_state_dict(seed: int = 0) -> dict[str, Tensor]:
    """A randomly initialised state dict of the real FID Inception-v3 (for tests and benchmarks without weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _inception_module(None)
        # Random weights make BatchNorm's unit running variance blow activations up over 90 layers; scale the
        # convolutions so features stay finite and informative.
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        return {k: v.clone() for k, v in net.state_dict().items()}


class InceptionV3(FeatureExtractor):
    """The FID Inception-v3 (see the module docstring): 2048-d pool3 features and 1008 unbiased logits."""

    dim = 2048
    has_logits = True

    def __init__(self, state: Mapping[str, Tensor], resize: str = "clean") -> None:
        super().__init__()
        if resize not in ("clean", "legacy"):
            raise ConfigError(f"eval.resize={resize!r} is invalid: must be 'clean' or 'legacy'")
        try:
            self.net = _inception_module(state)
        except RuntimeError as e:
            raise ConfigError(
                f"eval.inception_weights do not fit the FID Inception-v3 ({str(e).splitlines()[0]}): "
                "use torch-fidelity's weights-inception-2015-12-05 file"
            ) from None
        self.resize = resize
        self.extractor_id = f"inception-v3-{_sha(state)}-{resize}"
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = _to_rgb(images)
        if self.resize == "clean":
            x = clean_resize(x, INCEPTION_SIZE)
        else:
            x = interpolate_bilinear_2d_like_tensorflow1x(
                x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False
            )
        x = (x - 128) / 128  # the TF graph's normalisation
        n = self.net
        for name in (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
        ):  # fmt: skip
            x = getattr(n, name)(x)
        pool = torch.flatten(x, 1)
        return {"features": pool.float(), "logits": (pool @ n.fc.weight.T).float()}


# ------------------------------------------------------------------------------------------------------------
# The small extractor


class SmallExtractor(FeatureExtractor):
    """Fast random-network features for tracking on CPU (see the module docstring); 256-d, no logits."""

    dim = 256
    has_logits = False
    size = 64

    def __init__(self, state: Mapping[str, Tensor] | None = None, seed: int = 0) -> None:
        super().__init__()
        chans = [3, 32, 64, 128, self.dim]
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's default init draws from the global RNG
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in itertools.pairwise(chans))
        if state is None:
            gen = torch.Generator().manual_seed(seed)  # private: must not move the training RNG
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
                conv.bias.data.zero_()
            tag = f"seed{seed}"
        else:
            try:
                self.convs.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(
                    f"eval.small_weights do not fit the small extractor ({str(e).splitlines()[0]}): "
                    "save SmallExtractor().convs.state_dict()"
                ) from None
            tag = _sha(state)
        self.extractor_id = f"small-{tag}"
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = _to_rgb(images).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x / 127.5 - 1
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
        return {"features": x.mean(dim=(2, 3)).float()}


def build_extractor(cfg: EvalConfig, cache_dir: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor `cfg.extractor` names, with its weights from `cfg` (URLs copied into `cache_dir`)."""
    if cfg.extractor == "small":
        state = None
        if cfg.small_weights:
            data = read_weight_bytes(cfg.small_weights, cache_dir, "eval.small_weights")
            state = load_state_dict_bytes(data, "eval.small_weights", cfg.small_weights)
        return SmallExtractor(state).to(device)
    data = read_weight_bytes(cfg.inception_weights, cache_dir, "eval.inception_weights")
    state = load_state_dict_bytes(data, "eval.inception_weights", cfg.inception_weights)
    return InceptionV3(state, cfg.resize).to(device)


__all__ = [
    "INCEPTION_SIZE",
    "FeatureExtractor",
    "InceptionV3",
    "SmallExtractor",
    "build_extractor",
    "clean_resize",
    "load_state_dict_bytes",
    "pil_clean_resize",
    "random_inception_state_dict",
    "read_weight_bytes",
]
