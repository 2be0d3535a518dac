"""Class accuracy (acc) and intra-class FID (ifid) of class-conditional generators, on the synthetic shapes set.

The "generators" here draw real images from a bank of synthetic images (another seed than the dataset's), picked
by the latent: of the class they are asked for (`perfect`), of the next class (`shifted`), or of a class drawn
from the latent, whatever was asked (`blind`). A working classifier puts `perfect` at its ceiling, `shifted` at 0
and `blind` at chance; intra-class FID pairs generated and real images of one class, so `shifted` scores far worse
than `perfect`.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load, save
from torch import Tensor, nn

import pipeline.metrics.classifier as classifier_module
import pipeline.metrics.evaluate as evaluate_module
from pipeline.data import KINDS, ShardWriter, read_once, synthetic_sample, write_synthetic_dataset
from pipeline.data.synth import encode_png
from pipeline.errors import ConfigError
from pipeline.metrics import (
    EvalConfig,
    Evaluator,
    GaussianStats,
    SmallExtractor,
    better,
    class_reference_stats,
    dataset_classifier,
    real_features,
)
from pipeline.metrics.classifier import (
    CONFIDENT,
    ClassifierRecipe,
    Confidence,
    SmallClassifier,
    TrainedClassifier,
    confidence,
    held_out,
    labelled_reals,
    normalized_entropy,
)
from pipeline.metrics.extractors import FeatureExtractor
from pipeline.models.conditioning import ClassConditioning, NoConditioning
from pipeline.models.sampling import Sampler

RES = 32
NUM_CLASSES = len(KINDS)
SHORT_RECIPE = ClassifierRecipe(steps=20)  # where only the plumbing is tested, not the classifier's quality


def shape_bank(per_class: int, resolution: int = RES, seed: int = 99) -> Tensor:
    """uint8 [classes, per_class, 3, H, W]: synthetic images of each class (seed 99: not the dataset's images)."""
    out: list[list[Tensor]] = [[] for _ in KINDS]
    i = 0
    while min(len(b) for b in out) < per_class:
        image, spec = synthetic_sample(seed, i, resolution)
        i += 1
        if len(out[spec.label]) < per_class:
            out[spec.label].append(torch.from_numpy(image).permute(2, 0, 1))
    return torch.stack([torch.stack(b) for b in out])


class BankGenerator(nn.Module):
    """forward(z, c) -> a bank image in [-1, 1] (exactly its uint8 values after `to_uint8`), chosen by z; its class
    is c's (`perfect`), the next one (`shifted`) or drawn from z (`blind`). c: one-hot, class indices or None (an
    unconditional sampler's: class 0)."""

    def __init__(self, bank: Tensor, mode: str) -> None:
        super().__init__()
        self.z_dim, self.mode = 8, mode
        self.register_buffer("bank", bank)
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler finds the device through a parameter

    def forward(self, z: Tensor, c: Tensor | None) -> Tensor:
        classes, per_class = self.bank.shape[:2]
        if c is None:
            cls = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        else:
            cls = c.argmax(dim=1) if c.ndim == 2 else c.long()
        if self.mode == "shifted":
            cls = (cls + 1) % classes
        elif self.mode == "blind":
            cls = (z[:, 1].abs() * 1e4).long() % classes
        pick = (z[:, 0].abs() * 1e4).long() % per_class
        return self.bank[cls, pick].float() / 127.5 - 1


def bank_sampler(bank: Tensor, mode: str, encoding: str = "onehot") -> Sampler:
    return Sampler(BankGenerator(bank, mode).eval(), ClassConditioning(NUM_CLASSES, encoding=encoding))  # type: ignore[arg-type]


class ClassifierFeatures(FeatureExtractor):
    """The trained classifier's pooled features (64-d): an extractor that sees shapes. The small random extractor
    sees mostly colours, in which these classes do not differ, so its per-class FIDs are noise at test sizes."""

    dim = 64
    has_logits = False

    def __init__(self, trained: TrainedClassifier) -> None:
        super().__init__()
        self.net = trained.net
        self.extractor_id = f"test-features-{trained.classifier_id}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.net.prepare(images).float() / 127.5 - 1
        return {"features": self.net.body(x).amax(dim=(2, 3))}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in synthetic set as training makes it by default (2000 images), at 32px, in 8 shards."""
    out = tmp_path_factory.mktemp("class-metrics") / "shapes32"
    write_synthetic_dataset(str(out), n=2000, resolution=RES, seed=0, samples_per_shard=250)
    return str(out)


@pytest.fixture(scope="module")
def trained(labelled: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The default classifier of `labelled`, trained once into a cache these tests share (read-only)."""
    cache = str(tmp_path_factory.mktemp("class-metrics-cache"))
    t0 = time.perf_counter()
    clf, hit = dataset_classifier(labelled, cache_url=cache, resolution=RES)
    seconds = time.perf_counter() - t0
    print(f"\nclassifier: {seconds:.1f}s to read and train, held-out accuracy {clf.heldout_accuracy:.4f}")
    return {"classifier": clf, "cache": cache, "seconds": seconds, "hit": hit}


@pytest.fixture(scope="module")
def bank() -> Tensor:
    return shape_bank(100)


def _cache_copy(trained: dict[str, Any], tmp_path: Path) -> str:
    """A cache holding the trained classifier (and nothing else), for a test to write its own entries into."""
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache"], cache)
    return str(cache)


def test_the_classifier_learns_the_shapes(trained: dict[str, Any], labelled: str) -> None:
    clf: TrainedClassifier = trained["classifier"]
    assert not trained["hit"] and clf.num_classes == NUM_CLASSES
    assert clf.num_train + clf.num_heldout == 2000 and 150 <= clf.num_heldout <= 250  # ~10% held out, by key
    assert clf.heldout_accuracy >= 0.97
    (entry,) = glob.glob(f"{trained['cache']}/classifiers/classifier-32px-*.safetensors")
    head = Path(entry).read_bytes()[:9]
    assert head[8:9] == b"{"  # safetensors: a header length, then JSON; never a pickle


def test_acc_is_at_the_ceiling_for_a_class_perfect_generator_and_chance_for_a_blind_one(
    trained: dict[str, Any], labelled: str, bank: Tensor, tmp_path: Path, one_torch_thread: None
) -> None:
    cache = _cache_copy(trained, tmp_path)
    ev = Evaluator(EvalConfig(metrics=["acc1200"], cache_url=cache), labelled, RES, cache)
    perfect = ev.evaluate(bank_sampler(bank, "perfect"))
    assert set(perfect) == {"acc1200", "acc1200_ceiling", "acc1200_chance"}
    ceiling = trained["classifier"].heldout_accuracy
    assert perfect["acc1200_ceiling"] == ceiling and perfect["acc1200_chance"] == pytest.approx(1 / 6)
    assert perfect["acc1200"] >= ceiling - 0.03  # bank images are new to the classifier, like held-out reals
    assert ev.last_details["acc1200"]["classifier"] == trained["classifier"].classifier_id
    assert ev._extractor is None  # acc alone loads no feature extractor

    # one draw of classes per image, whatever the encoding: the indices a BigGAN-style embedding takes too
    blind = ev.evaluate(bank_sampler(bank, "blind", encoding="index"))
    assert abs(blind["acc1200"] - 1 / 6) < 0.05
    assert ev.evaluate(bank_sampler(bank, "shifted"))["acc1200"] <= 0.03
    assert ev.last_cache_hits == [True]  # the classifier came from the cache, once, and stayed loaded


def test_the_classifier_is_cached_and_not_retrained(
    shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labelled = shards  # 48 images: reading them is what a miss costs here
    calls: list[int] = []

    def fake_train(images, labels, keys, num_classes, recipe, device, should_stop):
        calls.append(len(keys))  # no training here: this test is about the cache
        torch.manual_seed(len(calls))
        heldout = Confidence(2, (1,) + (0,) * (num_classes - 1))
        return SmallClassifier(num_classes, recipe.widths).eval(), 0.5, len(keys) - 2, 2, heldout

    monkeypatch.setattr(classifier_module, "train_classifier", fake_train)
    cache = str(tmp_path / "cache")
    first, hit1 = dataset_classifier(labelled, cache_url=cache, resolution=16)
    second, hit2 = dataset_classifier(labelled, cache_url=cache, resolution=16)
    assert (hit1, hit2) == (False, True) and calls == [48]
    for k, v in first.net.state_dict().items():
        assert torch.equal(v, second.net.state_dict()[k]), k
    assert (second.heldout_accuracy, second.num_train, second.classifier_id) == (0.5, 46, first.classifier_id)
    assert second.heldout_confidence == first.heldout_confidence == Confidence(2, (1, 0, 0, 0, 0, 0))

    # another resolution, another recipe: other entries; an unreadable entry is a miss, then replaced
    dataset_classifier(labelled, cache_url=cache, resolution=8)
    dataset_classifier(labelled, cache_url=cache, resolution=16, recipe=SHORT_RECIPE)
    assert len(calls) == 3 and len(glob.glob(f"{cache}/classifiers/*.safetensors")) == 3
    (entry,) = glob.glob(f"{cache}/classifiers/{first.classifier_id}.safetensors")
    Path(entry).write_bytes(b"not a safetensors file")
    assert dataset_classifier(labelled, cache_url=cache, resolution=16)[1] is False and len(calls) == 4
    assert dataset_classifier(labelled, cache_url=cache, resolution=16)[1] is True and len(calls) == 4

    # an entry as version 1 wrote it (no held-out confidence), even under the current name: a miss, then replaced
    data = Path(entry).read_bytes()
    meta = dict(safe_open(entry, "pt").metadata())
    old = {k: v for k, v in meta.items() if not k.startswith(("heldout_confident", "confident_"))}
    Path(entry).write_bytes(save(load(data), metadata={**old, "version": "1"}))
    assert dataset_classifier(labelled, cache_url=cache, resolution=16)[1] is False and len(calls) == 5


def test_ifid_pairs_each_class_with_its_own_reals(
    trained: dict[str, Any], labelled: str, bank: Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:  # fmt: skip
    extractor = ClassifierFeatures(trained["classifier"])
    monkeypatch.setattr(evaluate_module, "build_extractor", lambda cfg, cache_dir, device: extractor)
    cache = _cache_copy(trained, tmp_path)
    cfg = EvalConfig(metrics=["ifid64", "ifid48_full"], cache_url=cache)
    ev = Evaluator(cfg, labelled, RES, cache)
    perfect = ev.evaluate(bank_sampler(bank, "perfect", encoding="index"))
    assert set(perfect) == {"ifid64", "ifid48_full"}
    details = ev.last_details
    assert list(details["ifid64"]["classes"]) == [str(k) for k in range(6)]
    assert set(details["ifid64"]["num_real"].values()) == {64}  # without _full: the class's first 64 reals
    assert sum(details["ifid48_full"]["num_real"].values()) == 2000  # _full: every real of each class
    assert perfect["ifid64"] == pytest.approx(sum(details["ifid64"]["classes"].values()) / 6)
    assert ev.last_cache_hits == [False, False]
    assert len(glob.glob(f"{cache}/refs/*-class*.npz")) == 12  # one entry per (class, count)

    shifted = ev.evaluate(bank_sampler(bank, "shifted", encoding="index"))
    assert ev.last_cache_hits == [False, False]  # the references stayed loaded: nothing read again
    for name in perfect:
        assert shifted[name] > 3 * perfect[name], name
        per_class = zip(ev.last_details[name]["classes"].values(), details[name]["classes"].values(), strict=True)
        assert all(s > p for s, p in per_class), name

    # a subset of the classes: the same per-class values (same latents, cached references), their mean
    subset = Evaluator(EvalConfig(metrics=["ifid64"], cache_url=cache, classes=[4, 1]), labelled, RES, cache)
    two = subset.evaluate(bank_sampler(bank, "perfect", encoding="index"))
    assert subset.last_cache_hits == [True]
    assert subset.last_details["ifid64"]["classes"] == {k: details["ifid64"]["classes"][k] for k in ("4", "1")}
    assert two["ifid64"] == pytest.approx((details["ifid64"]["classes"]["4"] + details["ifid64"]["classes"]["1"]) / 2)


def test_per_class_references_are_each_class_s_reals(shards: str, tmp_path: Path) -> None:
    ext = SmallExtractor()
    every = real_features(shards, ext, resolution=16, batch_size=7, keep_features=True)  # in key order
    labels = torch.cat([torch.as_tensor(b["label"]) for b in read_once(shards, batch_size=48, resolution=16)])
    assert every.features is not None and len(labels) == 48  # one shard after the other: key order here too
    for num_real in (3, None):
        stats, hit = class_reference_stats(shards, ext, [4, 1], cache_url=str(tmp_path), resolution=16,
                                           num_real=num_real, batch_size=5)  # fmt: skip
        assert not hit and list(stats) == [4, 1]
        for k in (4, 1):
            own = every.features[labels == k][:num_real]  # the class's first keys, or all of them
            assert stats[k].num == len(own) and len(own) >= 3
            np.testing.assert_allclose(stats[k].sum, GaussianStats.of(own).sum, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(stats[k].outer, GaussianStats.of(own).outer, rtol=1e-6, atol=1e-4)
    assert class_reference_stats(shards, ext, [1], cache_url=str(tmp_path), resolution=16, num_real=3)[1]


def test_best_metric_ranks_accuracy_up_and_intra_class_fid_down() -> None:
    EvalConfig(metrics=["acc10k", "ifid5k"], best_metric="acc10k").validate("eval")
    EvalConfig(metrics=["acc10k", "ifid5k"], best_metric="ifid5k").validate("eval")
    assert better("acc10k", 0.9, 0.8) and not better("acc10k", 0.7, 0.8)
    assert better("ifid5k_full", 3.0, 4.0) and not better("ifid5k_full", 5.0, 4.0)
    assert not better("acc10k", float("nan"), None)


def _one_line(excinfo: pytest.ExceptionInfo[ConfigError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_what_the_class_metrics_cannot_use_is_one_line(
    trained: dict[str, Any], labelled: str, bank: Tensor, tmp_path: Path
) -> None:
    cache = _cache_copy(trained, tmp_path)
    # an unconditional generator
    unconditional = Sampler(BankGenerator(bank, "perfect"), NoConditioning())  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["fid64", "acc1k", "ifid5k"], cache_url=cache), labelled, RES, cache).evaluate(
            unconditional
        )
    _one_line(e, "acc1k, ifid5k", "class-conditional generator", "'none'")
    # a dataset without labels
    unlabelled = str(tmp_path / "unlabelled")
    with ShardWriter(unlabelled, resolution=RES, samples_per_shard=8) as w:
        for i in range(16):
            w.write(f"{i:09d}", encode_png(synthetic_sample(0, i, RES)[0]))
    for metric in ("acc64", "ifid8"):
        with pytest.raises(ConfigError) as e:
            Evaluator(EvalConfig(metrics=[metric], cache_url=cache), unlabelled, RES, cache).evaluate(
                bank_sampler(bank, "perfect")
            )
        _one_line(e, metric, "class labels (.cls)", "--layout classes")
    with pytest.raises(ConfigError) as e:  # the classifier alone (as `ganpipe eval stats` asks for it)
        dataset_classifier(unlabelled, cache_url=cache, resolution=RES, who="acc64")
    _one_line(e, "acc64", "class labels (.cls)")
    # a generator with other classes than the data's; classes it does not have
    five = Sampler(BankGenerator(bank, "perfect"), ClassConditioning(5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["acc64"], cache_url=cache), labelled, RES, cache).evaluate(five)
    _one_line(e, "acc64", "5 classes", "has 6")
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["ifid8"], cache_url=cache, classes=[2, 6]), labelled, RES, cache).evaluate(
            bank_sampler(bank, "perfect")
        )
    _one_line(e, "eval.classes", "[6]", "0..5")
    # config and names
    for cfg, parts in [
        (EvalConfig(metrics=["ifid8"], classes=[-1]), ("eval.classes", "class indices >= 0")),
        (EvalConfig(metrics=["ifid8"], classes=[1, 1]), ("eval.classes", "twice")),
        (EvalConfig(metrics=["acc1k_full"]), ("eval.metrics", "acc1k_full", "drop '_full'")),
        (EvalConfig(metrics=["ifid1"]), ("eval.metrics", "at least 2 images per class")),
    ]:
        with pytest.raises(ConfigError) as e:
            cfg.validate("eval")
        _one_line(e, *parts)
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["acc1k"]), None, RES, cache)
    _one_line(e, "acc1k", "--data")


# ------------------------------------------------------------------------------------------------------------
# Recognisable samples (conf): any generator, a labelled dataset

# Classifier outputs the oracle test knows: per row, the class probabilities a fake classifier gives an image of that
# row. Top probabilities on both sides of CONFIDENT (0.9), none within float32 rounding of it.
PROBS = np.array(
    [
        [0.99, 0.002, 0.002, 0.002, 0.002, 0.002],  # class 0, confident
        [0.01, 0.95, 0.01, 0.01, 0.01, 0.01],  # class 1, confident
        [0.018, 0.018, 0.91, 0.018, 0.018, 0.018],  # class 2, confident
        [0.022, 0.022, 0.022, 0.89, 0.022, 0.022],  # class 3, just below
        [0.1, 0.1, 0.1, 0.1, 0.5, 0.1],  # class 4, unsure
        [1 / 6] * 6,  # no class at all
        [0.004, 0.004, 0.004, 0.004, 0.004, 0.98],  # class 5, confident
    ]
)


class RowGenerator(nn.Module):
    """forward(z, c) -> constant images whose value is a row of PROBS, chosen by z among `rows`; records the rows
    it drew, in order (one process draws images 0, 1, 2, ... in order)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__()
        self.z_dim, self.rows, self.drawn = 8, torch.tensor(rows), []
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        row = self.rows[(z[:, 0].abs() * 1e4).long() % len(self.rows)]
        self.drawn.extend(row.tolist())
        return row.float()[:, None, None, None].expand(-1, 3, 8, 8) / 127.5 - 1  # exactly `row` after to_uint8


class RowClassifier(SmallClassifier):
    """Logits log(PROBS[row]) of an image whose pixels hold `row`; counts its forward passes."""

    def __init__(self) -> None:
        super().__init__(NUM_CLASSES)
        self.calls = 0

    def forward(self, images: Tensor) -> Tensor:
        self.calls += 1
        return torch.log(torch.as_tensor(PROBS, dtype=torch.float32))[images[:, 0, 0, 0].long()]


def _oracle(rows: list[int]) -> tuple[float, float, list[int]]:
    """(share >= 0.9, normalised entropy of the confident ones' classes, their per-class counts), by hand."""
    p = PROBS[rows]
    sure = p.max(axis=1) >= 0.9
    counts = np.bincount(p.argmax(axis=1)[sure], minlength=NUM_CLASSES)
    spread = scipy.stats.entropy(counts) / np.log(NUM_CLASSES) if counts.sum() else float("nan")
    return float(sure.mean()), float(spread), counts.tolist()


def test_conf_counts_the_confidently_classified_samples_and_their_spread(
    labelled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert CONFIDENT == 0.9
    net = RowClassifier()
    heldout = Confidence(40, (6, 6, 6, 6, 6, 4))  # what training measured on the reals: 34 of 40 confident
    fake = TrainedClassifier(net, 1.0, 360, 40, "classifier-fake", heldout)
    monkeypatch.setattr(evaluate_module, "dataset_classifier", lambda url, **kw: (fake, True))
    cache = str(tmp_path / "cache")
    ev = Evaluator(EvalConfig(metrics=["conf150", "conf37"], batch_size=16, cache_url=cache), labelled, RES, cache)

    gen = RowGenerator(list(range(len(PROBS))))
    unconditional = Sampler(gen, NoConditioning())  # type: ignore[arg-type]
    out = ev.evaluate(unconditional)
    assert list(out) == [f"{m}{k}" for m in ("conf150", "conf37") for k in ("", "_reals", "_spread", "_spread_reals")]
    assert len(gen.drawn) == 150 and net.calls == 10  # one pass for both metrics: 150 images in batches of 16
    reals_spread = scipy.stats.entropy([6, 6, 6, 6, 6, 4]) / np.log(6)
    for name, n in (("conf150", 150), ("conf37", 37)):  # each metric uses images 0..N-1
        share, spread, counts = _oracle(gen.drawn[:n])
        assert 0.3 < share < 0.9 and 0.5 < spread < 1  # the rows cover both sides of the threshold
        assert out[name] == pytest.approx(share, abs=1e-12) and out[f"{name}_spread"] == pytest.approx(spread)
        assert out[f"{name}_reals"] == pytest.approx(34 / 40) and out[f"{name}_spread_reals"] == pytest.approx(
            reals_spread
        )
        details = ev.last_details[name]
        assert details["counts"] == {str(k): c for k, c in enumerate(counts)}
        assert details["counts_reals"] == {"0": 6, "1": 6, "2": 6, "3": 6, "4": 6, "5": 4}
        assert details["class_names"] == list(KINDS) and details["threshold"] == 0.9
        assert details["classifier"] == "classifier-fake" and details["num_heldout"] == 40

    # every confident sample in one class: spread 0; none confident: share 0, spread NaN (no histogram to spread)
    one = ev.evaluate(Sampler(RowGenerator([0, 4]), NoConditioning()))  # type: ignore[arg-type]
    assert 0 < one["conf150"] < 1 and one["conf150_spread"] == 0.0
    unsure = ev.evaluate(Sampler(RowGenerator([3, 4, 5]), NoConditioning()))  # type: ignore[arg-type]
    assert unsure["conf150"] == 0.0 and math.isnan(unsure["conf150_spread"])
    assert ev.last_details["conf150"]["counts"] == dict.fromkeys(map(str, range(6)), 0)


def test_confidence_and_its_spread_by_hand() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(0, 50, size=int(rng.integers(2, 12))).tolist()
        want = scipy.stats.entropy(counts) / np.log(len(counts)) if sum(counts) else float("nan")
        assert normalized_entropy(counts) == pytest.approx(want, nan_ok=True)
    assert normalized_entropy([5, 5, 5]) == pytest.approx(1.0) and normalized_entropy([0, 7, 0]) == 0.0
    assert math.isnan(normalized_entropy([0, 0])) and math.isnan(normalized_entropy([9]))
    top_class = torch.tensor([0, 1, 1, 2, 2, 2])
    top_prob = torch.tensor([0.9, 0.95, 0.8999, 1.0, 0.5, 0.91])  # the threshold itself counts
    c = confidence(top_class, top_prob, 4)
    assert c == Confidence(6, (1, 1, 2, 0)) and c.share == pytest.approx(4 / 6)
    assert math.isnan(Confidence(0, (0, 0)).share)


def test_conf_of_the_dataset_s_own_held_out_reals_is_its_reals_figure(
    trained: dict[str, Any], labelled: str, tmp_path: Path, one_torch_thread: None
) -> None:
    clf: TrainedClassifier = trained["classifier"]
    images, _, keys, _ = labelled_reals(labelled, resolution=RES, max_reals=50_000, batch_size=250)
    reals = images[torch.tensor([held_out(k, 10) for k in keys])]  # exactly the images the classifier held out
    assert len(reals) == clf.num_heldout
    bank = reals[None]  # one "class": the generator picks a held-out real by its latent, ignoring c
    unconditional = Sampler(BankGenerator(bank, "perfect"), NoConditioning())  # type: ignore[arg-type]
    cache = _cache_copy(trained, tmp_path)
    with pytest.raises(ConfigError) as e:  # acc refuses a generator without classes; conf takes it
        Evaluator(EvalConfig(metrics=["acc1k"], cache_url=cache), labelled, RES, cache).evaluate(unconditional)
    _one_line(e, "acc1k", "class-conditional generator")
    ev = Evaluator(EvalConfig(metrics=["conf2k"], cache_url=cache), labelled, RES, cache)
    out = ev.evaluate(unconditional)
    print(f"\nheld-out reals: confident {out['conf2k_reals']:.4f}, spread {out['conf2k_spread_reals']:.4f}; the same "
          f"reals drawn as generated: {out['conf2k']:.4f}, {out['conf2k_spread']:.4f}")  # fmt: skip
    assert ev.last_cache_hits == [True] and 0.5 < out["conf2k_reals"] <= 1 and out["conf2k_spread_reals"] > 0.95
    # 2000 draws with replacement from the ~200 held-out reals: the same share up to sampling noise (std ~0.01)
    assert out["conf2k"] == pytest.approx(out["conf2k_reals"], abs=0.04)
    assert out["conf2k_spread"] == pytest.approx(out["conf2k_spread_reals"], abs=0.03)


def test_the_held_out_reals_confidence_is_stored_with_the_classifier(
    trained: dict[str, Any], labelled: str, one_torch_thread: None
) -> None:
    clf: TrainedClassifier = trained["classifier"]
    (entry,) = glob.glob(f"{trained['cache']}/classifiers/{clf.classifier_id}.safetensors")
    with safe_open(entry, "pt") as f:
        meta = f.metadata()
    # recomputed here: the held-out reals (by key), the stored network's softmax, the threshold
    images, labels, keys, _ = labelled_reals(labelled, resolution=RES, max_reals=50_000, batch_size=250)
    hold = torch.tensor([held_out(k, 10) for k in keys])
    with torch.no_grad():
        probs = torch.softmax(clf.net(images[hold]), dim=1).numpy()
    sure = probs.max(axis=1) >= 0.9
    counts = np.bincount(probs.argmax(axis=1)[sure], minlength=NUM_CLASSES).tolist()
    assert float(meta["confident_threshold"]) == 0.9
    assert float(meta["heldout_confident_share"]) == pytest.approx(sure.mean(), abs=1e-12)
    assert json.loads(meta["heldout_confident_counts"]) == counts
    assert float(meta["heldout_confident_spread"]) == pytest.approx(scipy.stats.entropy(counts) / np.log(6))
    assert clf.heldout_confidence == Confidence(int(hold.sum()), tuple(counts))
    assert clf.heldout_accuracy == pytest.approx(float((probs.argmax(axis=1) == labels[hold].numpy()).mean()))


def test_conf_refuses_data_without_labels_in_one_line(bank: Tensor, tmp_path: Path) -> None:
    unlabelled = str(tmp_path / "unlabelled")
    with ShardWriter(unlabelled, resolution=RES, samples_per_shard=8) as w:
        for i in range(16):
            w.write(f"{i:09d}", encode_png(synthetic_sample(0, i, RES)[0]))
    cache = str(tmp_path / "cache")
    unconditional = Sampler(BankGenerator(bank, "perfect"), NoConditioning())  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["fid16", "conf64"], cache_url=cache), unlabelled, RES, cache).evaluate(
            unconditional
        )
    _one_line(e, "conf64 need", "class labels (.cls)", "--layout classes")
    assert "fid16" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        EvalConfig(metrics=["conf1k_full"]).validate("eval")
    _one_line(e, "eval.metrics", "conf1k_full", "drop '_full'")
    with pytest.raises(ConfigError) as e:
        Evaluator(EvalConfig(metrics=["conf1k"]), None, RES, cache)
    _one_line(e, "conf1k", "--data")


def test_acc_and_conf_share_one_classifier_pass(
    trained: dict[str, Any], labelled: str, bank: Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:  # fmt: skip
    cache = _cache_copy(trained, tmp_path)
    alone = Evaluator(EvalConfig(metrics=["acc300"], cache_url=cache), labelled, RES, cache)
    acc = alone.evaluate(bank_sampler(bank, "perfect"))
    calls: list[int] = []
    classify = TrainedClassifier.classify
    monkeypatch.setattr(TrainedClassifier, "classify", lambda self, x: calls.append(len(x)) or classify(self, x))
    both = Evaluator(EvalConfig(metrics=["acc300", "conf300", "conf100"], cache_url=cache), labelled, RES, cache)
    out = both.evaluate(bank_sampler(bank, "perfect"))
    assert calls == [64, 64, 64, 64, 44]  # every image classified once, for all three metrics
    assert {k: out[k] for k in acc} == acc  # acc is what it is alone
    assert 0.5 < out["conf300"] <= 1 and out["conf300_reals"] == trained["classifier"].heldout_confidence.share
    assert sum(both.last_details["conf300"]["counts"].values()) == round(out["conf300"] * 300)


def test_best_metric_ranks_confident_share_up() -> None:
    EvalConfig(metrics=["conf10k", "fid10k"], best_metric="conf10k").validate("eval")
    assert better("conf10k", 0.9, 0.8) and not better("conf10k", 0.7, 0.8)
    assert not better("conf10k", float("nan"), None)


# ------------------------------------------------------------------------------------------------------------
# Several ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _class_metrics(data: str, cache: str) -> dict[str, Any]:
    """acc, conf and ifid of the perfect bank generator with the small extractor on the 16px set of 48 (conftest's
    `shards`); trains the short-recipe classifier (on rank 0 only, under several ranks): the cache starts empty."""
    classifier_module.DEFAULT_RECIPE = SHORT_RECIPE  # this process's (a spawned worker's or the test's) recipe
    trainings: list[int] = []
    train = classifier_module.train_classifier
    classifier_module.train_classifier = lambda *a, **k: trainings.append(1) or train(*a, **k)
    try:
        cfg = EvalConfig(metrics=["acc100", "conf100", "ifid6", "ifid4_full"], extractor="small", batch_size=5,
                         cache_url=cache, classes=[0, 3, 5])  # fmt: skip
        ev = Evaluator(cfg, data, 16, cache)
        results = ev.evaluate(bank_sampler(shape_bank(10, 16), "perfect"))
    finally:
        classifier_module.train_classifier = train
    return {"results": results, "details": ev.last_details, "trainings": len(trainings)}


def _worker(rank: int, world: int, port: int, data: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_class_metrics(data, cache), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "dist.pt")
    # Two ranks on two cores: one BLAS thread each, or scipy's eigh (FID) spins ~100x slower (found here: 0.6 s
    # instead of 10 ms at 256-d). The workers load BLAS at import, after reading this.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, _free_port(), shards, str(tmp_path / "cache-dist"), out), nprocs=2, join=True)
    distributed, other = (torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1))  # our own files
    assert (distributed["trainings"], other["trainings"]) == (1, 0)  # rank 0 trained; rank 1 received its weights
    np.testing.assert_equal(other["results"], distributed["results"])  # NaN equals NaN here (conf's spread)
    assert other["details"] == distributed["details"]

    monkeypatch.setattr(classifier_module, "DEFAULT_RECIPE", SHORT_RECIPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, so the same float rounding
    try:
        single = _class_metrics(shards, str(tmp_path / "cache-single"))
    finally:
        torch.set_num_threads(threads)
    # rank 0 trained the classifier alone and sent it to rank 1: the same weights as one process trains
    assert distributed["details"]["acc100"] == single["details"]["acc100"]
    assert distributed["results"]["acc100"] == single["results"]["acc100"]
    assert distributed["details"]["conf100"] == single["details"]["conf100"]  # the same confident images per class
    assert set(distributed["results"]) == set(single["results"])
    for k, v in single["results"].items():
        assert distributed["results"][k] == pytest.approx(v, rel=1e-4, abs=1e-7, nan_ok=True), k
    for name in ("ifid6", "ifid4_full"):
        assert distributed["details"][name]["num_real"] == single["details"][name]["num_real"]
        assert list(distributed["details"][name]["classes"]) == ["0", "3", "5"]
        for k, v in single["details"][name]["classes"].items():
            assert distributed["details"][name]["classes"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (name, k)
