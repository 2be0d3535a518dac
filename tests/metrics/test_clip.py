"""CLIP score with a tiny, randomly initialised CLIP built from a config, saved and loaded like a real one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.metrics import clip_score
from pipeline.metrics.clip import CLIPEncoder

transformers = pytest.importorskip("transformers")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (so every byte has a vocabulary entry)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny-clip")
    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(out)
    return out


def test_clip_score_matches_transformers_own_pipeline(tiny_clip: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle", "two blue squares", "a green triangle on grey", "nothing"]
    enc = CLIPEncoder.load(str(tiny_clip))
    img_ours, txt_ours = enc.encode_images(images), enc.encode_texts(captions)
    ours = clip_score(img_ours, txt_ours)

    # Independent: transformers' processor (PIL preprocessing) and the model's forward, cosine by hand.
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=captions, images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt",
                       padding=True)  # fmt: skip
    with torch.no_grad():
        out = model(**inputs)
    img, txt = out.image_embeds, out.text_embeds  # already normalised
    cos = (img * txt).sum(1)
    torch.testing.assert_close(torch.cosine_similarity(img_ours, txt_ours, dim=1), cos, rtol=1e-4, atol=1e-5)
    assert ours == pytest.approx(float(100 * cos.clamp(min=0).mean()), rel=1e-4, abs=1e-6)
    # with the texts negated every clamped cosine becomes positive: the score is not trivially 0
    assert clip_score(img_ours, -txt_ours) == pytest.approx(float(100 * (-cos).clamp(min=0).mean()), rel=1e-4)
    assert max(ours, clip_score(img_ours, -txt_ours)) > 1


def test_missing_clip_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.clip_model"):
        CLIPEncoder.load(str(tmp_path / "nothing-here"))
