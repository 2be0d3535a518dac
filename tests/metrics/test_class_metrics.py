"""Class accuracy (acc) and intra-class FID (ifid) of class-conditional generators, on the synthetic shapes set.

The "generators" here draw real images from a bank of synthetic images (another seed than the dataset's), picked
by the latent: of the class they are asked for (`perfect`), of the next class (`shifted`), or of a class drawn
from the latent, whatever was asked (`blind`). A working classifier puts `perfect` at its ceiling, `shifted` at 0
and `blind` at chance; intra-class FID pairs generated and real images of one class, so `shifted` scores far worse
than `perfect`.
"""

from __future__ import annotations

import glob
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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
from pipeline.metrics.classifier import ClassifierRecipe, SmallClassifier, TrainedClassifier
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
    is c's (`perfect`), the next one (`shifted`) or drawn from z (`blind`). c: one-hot or class indices."""

    def __init__(self, bank: Tensor, mode: str) -> None:
        super().__init__()
        self.z_dim, self.mode = 8, mode
        self.register_buffer("bank", bank)
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler finds the device through a parameter

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        classes, per_class = self.bank.shape[:2]
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
        return SmallClassifier(num_classes, recipe.widths).eval(), 0.5, len(keys) - 2, 2

    monkeypatch.setattr(classifier_module, "train_classifier", fake_train)
    cache = str(tmp_path / "cache")
    first, hit1 = dataset_classifier(labelled, cache_url=cache, resolution=16)
    second, hit2 = dataset_classifier(labelled, cache_url=cache, resolution=16)
    assert (hit1, hit2) == (False, True) and calls == [48]
    for k, v in first.net.state_dict().items():
        assert torch.equal(v, second.net.state_dict()[k]), k
    assert (second.heldout_accuracy, second.num_train, second.classifier_id) == (0.5, 46, first.classifier_id)

    # another resolution, another recipe: other entries; an unreadable entry is a miss, then replaced
    dataset_classifier(labelled, cache_url=cache, resolution=8)
    dataset_classifier(labelled, cache_url=cache, resolution=16, recipe=SHORT_RECIPE)
    assert len(calls) == 3 and len(glob.glob(f"{cache}/classifiers/*.safetensors")) == 3
    (entry,) = glob.glob(f"{cache}/classifiers/{first.classifier_id}.safetensors")
    Path(entry).write_bytes(b"not a safetensors file")
    assert dataset_classifier(labelled, cache_url=cache, resolution=16)[1] is False and len(calls) == 4
    assert dataset_classifier(labelled, cache_url=cache, resolution=16)[1] is True and len(calls) == 4


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
# Several ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _class_metrics(data: str, cache: str) -> dict[str, Any]:
    """acc and ifid of the perfect bank generator with the small extractor on the 16px set of 48 (conftest's
    `shards`); trains the short-recipe classifier (on rank 0 only, under several ranks): the cache starts empty."""
    classifier_module.DEFAULT_RECIPE = SHORT_RECIPE  # this process's (a spawned worker's or the test's) recipe
    trainings: list[int] = []
    train = classifier_module.train_classifier
    classifier_module.train_classifier = lambda *a, **k: trainings.append(1) or train(*a, **k)
    try:
        cfg = EvalConfig(metrics=["acc100", "ifid6", "ifid4_full"], extractor="small", batch_size=5, cache_url=cache,
                         classes=[0, 3, 5])  # fmt: skip
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
    assert other["results"] == distributed["results"] and other["details"] == distributed["details"]

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
    assert set(distributed["results"]) == set(single["results"])
    for k, v in single["results"].items():
        assert distributed["results"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    for name in ("ifid6", "ifid4_full"):
        assert distributed["details"][name]["num_real"] == single["details"][name]["num_real"]
        assert list(distributed["details"][name]["classes"]) == ["0", "3", "5"]
        for k, v in single["details"][name]["classes"].items():
            assert distributed["details"][name]["classes"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (name, k)
