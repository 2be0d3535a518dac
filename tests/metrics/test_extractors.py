"""Extractors load through the same path/URL code real weights use; random weights of the real architectures."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import ConfigError
from pipeline.metrics import EvalConfig, InceptionV3, SmallExtractor, build_extractor, random_inception_state_dict
from pipeline.metrics.extractors import clean_resize, pil_clean_resize


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    return random_inception_state_dict(seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_inception_from_a_local_file_and_its_features(tmp_path, inception_state, images) -> None:
    path = tmp_path / "inception.pth"
    torch.save(inception_state, path)
    ext = build_extractor(EvalConfig(inception_weights=str(path)), str(tmp_path / "cache"))
    assert isinstance(ext, InceptionV3)
    loaded = ext.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in inception_state.items())
    out = ext(images)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert torch.isfinite(out["features"]).all() and out["features"].std() > 0
    # The logits are pool3 @ fc.weight.T without the bias (torch-fidelity's 'logits_unbiased')
    torch.testing.assert_close(out["logits"], out["features"] @ inception_state["fc.weight"].T)
    assert ext.extractor_id.startswith("inception-v3-") and ext.extractor_id.endswith("-clean")


def test_inception_from_a_url_is_copied_into_the_cache_once(tmp_path, inception_state) -> None:
    url = "memory://weights-test/inception.safetensors"
    with fsspec.open(url, "wb") as fh:
        from safetensors.torch import save

        fh.write(save(inception_state))
    cache = tmp_path / "cache"
    first = build_extractor(EvalConfig(inception_weights=url, resize="legacy"), str(cache))
    assert os.path.exists(cache / "weights" / "inception.safetensors")
    fsspec.filesystem("memory").rm("/weights-test/inception.safetensors")  # the copy is used from now on
    second = build_extractor(EvalConfig(inception_weights=url, resize="legacy"), str(cache))
    assert first.extractor_id == second.extractor_id and first.extractor_id.endswith("-legacy")


def test_clean_and_legacy_resize_differ(inception_state, images) -> None:
    clean, legacy = InceptionV3(inception_state, "clean"), InceptionV3(inception_state, "legacy")
    a, b = clean(images[:1])["features"], legacy(images[:1])["features"]
    assert not torch.allclose(a, b)
    assert clean.extractor_id != legacy.extractor_id  # so cached statistics are never mixed


@pytest.mark.parametrize("res", [16, 64, 256])
def test_clean_resize_is_clean_fids_pil_resize(res: int) -> None:
    x = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(res))
    ours, pil = clean_resize(x, 299), pil_clean_resize(x, 299)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 299, 299)
    assert (ours - pil).abs().max() < 0.01  # of 255: float rounding only, never a quantisation step


def test_weight_files_that_run_code_or_do_not_fit_are_refused(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(ConfigError, match="not a readable state dict"):
        build_extractor(EvalConfig(inception_weights=str(evil)), str(tmp_path))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ConfigError, match="do not fit the FID Inception-v3"):
        build_extractor(EvalConfig(inception_weights=str(wrong)), str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        build_extractor(EvalConfig(inception_weights=str(tmp_path / "missing.pth")), str(tmp_path))


def test_small_extractor_is_fixed_and_loadable(tmp_path, images) -> None:
    a, b = SmallExtractor(), SmallExtractor()
    torch.testing.assert_close(a(images)["features"], b(images)["features"], rtol=0, atol=0)
    assert a(images)["features"].shape == (2, 256)
    rng_before = torch.get_rng_state()
    SmallExtractor()
    assert torch.equal(rng_before, torch.get_rng_state())  # building it never moves the training RNG
    other = SmallExtractor(seed=1).convs.state_dict()
    path = tmp_path / "small.safetensors"
    save_file(other, path)
    loaded = build_extractor(EvalConfig(extractor="small", small_weights=str(path)), str(tmp_path))
    torch.testing.assert_close(loaded(images)["features"], SmallExtractor(seed=1)(images)["features"])
    assert loaded.extractor_id != a.extractor_id
