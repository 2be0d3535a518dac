"""CLIP image and text encoders for CLIP score, from a local Hugging Face folder or the Hugging Face cache.

Job: `CLIPEncoder.load(name_or_path)` -> embeddings of uint8 images and of captions. Nothing is downloaded:
`local_files_only=True`, so a model must be saved (`save_pretrained`) or already be in the HF cache
(e.g. `openai/clip-vit-large-patch14` fetched once with `huggingface-cli download`).

We use transformers' `CLIPModel` and tokenizer rather than open_clip because the HF folder format carries its own
config (so a tiny random CLIP for tests is just a `CLIPConfig`) and torchmetrics' CLIPScore uses the same models.
Image preprocessing is done in torch (resize shorter side with antialiased bicubic, center crop, normalise with
the processor's mean/std) so it runs on the GPU batch by batch instead of through PIL.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEncoder(nn.Module):
    """A transformers CLIPModel with its tokenizer; `encode_images` and `encode_texts` return projected embeddings."""

    def __init__(self, model: nn.Module, tokenizer, mean=_OPENAI_MEAN, std=_OPENAI_STD) -> None:
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, name_or_path: str, device: str | torch.device = "cpu") -> CLIPEncoder:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name_or_path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"eval.clip_model={name_or_path!r} cannot be loaded ({str(e).splitlines()[0][:120]}): give a folder "
                "written by CLIPModel.save_pretrained or a model already in the Hugging Face cache"
            ) from None
        mean, std = _OPENAI_MEAN, _OPENAI_STD
        proc = os.path.join(name_or_path, "preprocessor_config.json")
        if os.path.exists(proc):
            with open(proc) as fh:
                p = json.load(fh)
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        return cls(model, tokenizer, mean, std).to(device)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        x = images.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        x = F.interpolate(x, size=(max(round(h * scale), self.image_size), max(round(w * scale), self.image_size)),
                          mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)  # fmt: skip
        top, left = (x.shape[-2] - self.image_size) // 2, (x.shape[-1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        x = (x - self.mean) / self.std
        return self._tensor(self.model.get_image_features(pixel_values=x))

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: v.to(self.mean.device) for k, v in tokens.items()}
        return self._tensor(self.model.get_text_features(**tokens))

    @staticmethod
    def _tensor(out: object) -> Tensor:
        # transformers 5 may return a model-output object instead of a tensor; take its pooled embedding.
        if isinstance(out, Tensor):
            return out.float()
        for name in ("pooler_output", "image_embeds", "text_embeds"):
            value = getattr(out, name, None)
            if isinstance(value, Tensor):
                return value.float()
        raise TypeError(f"unexpected CLIP output {type(out).__name__}")


__all__ = ["CLIPEncoder"]
