"""Evaluation during training on the tiny recipe: the small extractor, metrics.jsonl, loggers, best checkpoint."""

from __future__ import annotations

import csv
import json
import math

import torch

from pipeline.train import list_checkpoints, load_checkpoint, train


def _records(run_dir: str) -> list[dict]:
    with open(f"{run_dir}/metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_tiny_recipe_writes_metrics_during_training(make_config) -> None:
    cfg = make_config(
        "train.total_kimg=0.048",
        "eval.metrics=[fid32_full,kid32,pr32_full]",
        "eval.extractor=small",
        "eval.every_kimg=0.016",
        "eval.batch_size=16",
        "eval.best_metric=fid32_full",
        "logger.csv=true",
        "train.log_every_kimg=0.008",
    )
    result = train(cfg)
    assert result.kimg == 0.048
    records = _records(cfg.run_dir)
    # every 16 images (2 batches of 8) and no extra evaluation at the end (48 was just evaluated)
    assert [r["cur_nimg"] for r in records] == [16, 32, 48]
    for r in records:
        assert r["extractor"] == "small-seed0" and r["num_ranks"] == 1
        assert set(r["results"]) == {
            "fid32_full", "kid32", "kid32_std", "pr32_full_precision", "pr32_full_recall"
        }  # fmt: skip
        assert all(math.isfinite(v) for v in r["results"].values())
        assert r["results"]["fid32_full"] > 0
    with open(f"{cfg.run_dir}/logs/metrics.csv") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("metrics/fid32_full")]
    assert [float(row["metrics/fid32_full"]) for row in rows] == [r["results"]["fid32_full"] for r in records]

    with open(f"{cfg.run_dir}/checkpoints/best-fid32_full.json") as fh:
        best = json.load(fh)
    assert best["value"] == min(r["results"]["fid32_full"] for r in records)
    state = load_checkpoint(best["checkpoint"])
    assert state["counters"]["cur_nimg"] == round(best["kimg"] * 1000)
    assert all(not u.endswith("best-fid32_full.pt") for u in list_checkpoints(cfg.run_dir))  # never pruned/resumed


def test_evaluation_does_not_change_training(make_config, tmp_path) -> None:
    base = ["train.total_kimg=0.024"]
    plain = train(make_config(*base, f"run_dir={tmp_path / 'plain'}"))
    evaluated = train(
        make_config(
            *base,
            f"run_dir={tmp_path / 'eval'}",
            "eval.metrics=[fid16_full]",
            "eval.extractor=small",
            "eval.every_kimg=0.008",
        )
    )
    a, b = load_checkpoint(plain.checkpoint), load_checkpoint(evaluated.checkpoint)
    for k in a["G"]:
        assert torch.equal(a["G"][k], b["G"][k]), k
    assert len(_records(str(tmp_path / "eval"))) == 3


def test_class_metrics_during_training_keep_the_most_accurate_checkpoint(make_config, monkeypatch) -> None:
    import pipeline.metrics.classifier as classifier_module
    from pipeline.metrics.classifier import ClassifierRecipe

    monkeypatch.setattr(classifier_module, "DEFAULT_RECIPE", ClassifierRecipe(steps=20))  # plumbing, not quality
    calls: list[int] = []
    real_train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    cfg = make_config(
        "model.c_dim=6",  # the synthetic shapes' 6 classes
        "train.total_kimg=0.032",
        "eval.metrics=[acc32,ifid4]",
        "eval.classes=[0,2]",
        "eval.extractor=small",
        "eval.every_kimg=0.016",
        "eval.batch_size=16",
        "eval.best_metric=acc32",
    )
    train(cfg)
    records = _records(cfg.run_dir)
    assert [r["cur_nimg"] for r in records] == [16, 32]
    for r in records:
        assert set(r["results"]) == {"acc32", "acc32_ceiling", "acc32_chance", "ifid4"}
        assert 0 <= r["results"]["acc32"] <= 1 and r["results"]["acc32_chance"] == 1 / 6
        assert math.isfinite(r["results"]["ifid4"]) and r["results"]["ifid4"] > 0
    assert calls == [1]  # trained at the first evaluation, then kept
    with open(f"{cfg.run_dir}/checkpoints/best-acc32.json") as fh:
        best = json.load(fh)
    assert best["value"] == max(r["results"]["acc32"] for r in records)  # higher is better


def test_conf_during_training_of_an_unconditional_generator(make_config, monkeypatch) -> None:
    import pipeline.metrics.classifier as classifier_module
    from pipeline.metrics.classifier import ClassifierRecipe

    monkeypatch.setattr(classifier_module, "DEFAULT_RECIPE", ClassifierRecipe(steps=20))  # plumbing, not quality
    cfg = make_config(
        "train.total_kimg=0.032",
        "eval.metrics=[conf32]",
        "eval.every_kimg=0.016",
        "eval.batch_size=16",
        "eval.best_metric=conf32",
    )
    assert cfg.model.c_dim == 0  # unconditional: conf needs only the dataset's labels
    train(cfg)
    records = _records(cfg.run_dir)
    assert [r["cur_nimg"] for r in records] == [16, 32]
    for r in records:
        assert list(r["results"]) == ["conf32", "conf32_reals", "conf32_spread", "conf32_spread_reals"]
        assert 0 <= r["results"]["conf32"] <= 1 and r["extractor"] is None
    assert len({r["results"]["conf32_reals"] for r in records}) == 1  # one classifier for the whole run
    with open(f"{cfg.run_dir}/checkpoints/best-conf32.json") as fh:
        best = json.load(fh)
    shares = [r["results"]["conf32"] for r in records]
    assert best["value"] == max(shares) and best["kimg"] == records[shares.index(max(shares))]["kimg"]
