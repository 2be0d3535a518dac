"""`ganpipe eval` after training (run dir and export, Inception with random weights) and `ganpipe eval stats`."""

from __future__ import annotations

import glob
import json
import math

import torch

from pipeline.cli import main
from pipeline.data import write_synthetic_dataset
from pipeline.metrics import random_inception_state_dict
from pipeline.train import train


def test_eval_stats_then_eval_a_run_dir_with_inception(make_config, tmp_path, capsys) -> None:
    # Inception-v3 costs ~1 s per image on a shared CPU core: 4 reals and 4 generated images.
    shards = str(tmp_path / "reals")
    write_synthetic_dataset(shards, n=8, resolution=16, seed=1, samples_per_shard=4)
    cfg = make_config("train.total_kimg=0.008")
    train(cfg)
    capsys.readouterr()  # Lightning's model summary
    weights = tmp_path / "inception.pth"
    torch.save(random_inception_state_dict(), weights)
    cache = str(tmp_path / "evalcache")
    common = [
        "--extractor",
        "inception",
        "--inception-weights",
        str(weights),
        "--cache",
        cache,
        "--batch-size",
        "4",
        "--no-progress",
    ]

    assert main(["eval", "stats", shards, "--metrics", "fid4,kid4", *common]) == 0
    (entry,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert entry["num_real"] == 4 and entry["cache_hit"] is False and entry["extractor"].startswith("inception-v3")

    jsonl = str(tmp_path / "evals.jsonl")
    args = ["--metrics", "fid4,kid4,is4", "--data", shards, "--jsonl", jsonl, *common]
    assert main(["eval", cfg.run_dir, *args]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["results"]) == {"fid4", "kid4", "kid4_std", "is4", "is4_std"}
    assert all(math.isfinite(v) for v in record["results"].values()) and record["kimg"] == 0.008
    # IS = exp(E[KL]) >= 1 only up to rounding: the mean of near-zero KLs can come out as -1e-16 on some CPUs.
    assert record["results"]["is4"] >= 1.0 - 1e-9
    assert len(glob.glob(f"{cache}/refs/*.npz")) == 1  # the reals of `eval stats` were reused, not recomputed

    with open(jsonl) as fh:
        assert json.loads(fh.read())["results"] == record["results"]


def test_export_and_checkpoint_give_the_same_numbers(make_config, shards, tmp_path, capsys) -> None:
    cfg = make_config("train.total_kimg=0.008")
    train(cfg)
    export = str(tmp_path / "export")
    assert main(["export", cfg.run_dir, "--out", export]) == 0
    capsys.readouterr()
    args = ["--metrics", "fid16_full,pr16", "--data", shards, "--extractor", "small", "--no-progress"]
    assert main(["eval", cfg.run_dir, *args, "--cache", str(tmp_path / "c1")]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", export, *args, "--cache", str(tmp_path / "c2")]) == 0
    from_export = json.loads(capsys.readouterr().out)
    assert from_run["results"] == from_export["results"]  # G_ema of the checkpoint and of its export
    assert from_run["extractor"] == "small-seed0"


def test_eval_errors_are_one_line(make_config, tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path / "nothing"), "--metrics", "fid8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--metrics", "fdi8"]) == 2
    assert "metric 'fdi8' is unknown" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--metrics", "acc8_full"]) == 2
    err = capsys.readouterr().err
    assert "acc8_full" in err and "drop '_full'" in err and err.count("\n") == 1
    assert main(["eval", str(tmp_path), "--metrics", "ifid8", "--classes", "0,two"]) == 2
    err = capsys.readouterr().err
    assert "--classes '0,two' is invalid" in err and err.count("\n") == 1


def test_class_metrics_of_a_class_conditional_run(make_config, tmp_path, capsys, monkeypatch) -> None:
    import pipeline.metrics.classifier as classifier_module
    from pipeline.data import synthetic_dataset_url
    from pipeline.metrics.classifier import ClassifierRecipe

    monkeypatch.setattr(classifier_module, "DEFAULT_RECIPE", ClassifierRecipe(steps=20))  # plumbing, not quality
    calls: list[int] = []
    real_train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    cfg = make_config("model.c_dim=6", "train.total_kimg=0.008")
    train(cfg)
    capsys.readouterr()
    data = synthetic_dataset_url(cfg.data.resolved_cache_dir(), cfg.data.synth.n, 16, cfg.data.synth.seed)
    common = ["--metrics", "acc64,ifid4", "--classes", "2,0", "--extractor", "small", "--cache",
              str(tmp_path / "evalcache"), "--no-progress"]  # fmt: skip

    assert main(["eval", "stats", data, *common]) == 0  # the classifier and the two classes' references, ahead
    acc, ifid = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert acc["metric"] == "acc64" and acc["cache_hit"] is False and acc["num_train"] > 40
    assert ifid["metric"] == "ifid4" and set(ifid["num_real"]) == {"0", "2"} and ifid["cache_hit"] is False

    assert main(["eval", cfg.run_dir, *common]) == 0  # the run's own data (the synthetic set), from the cache
    record = json.loads(capsys.readouterr().out)
    assert set(record["results"]) == {"acc64", "acc64_ceiling", "acc64_chance", "ifid4"}
    assert record["data"] == data and record["extractor"] == "small-seed0" and calls == [1]
    assert record["details"]["acc64"]["classifier"] == acc["classifier"]
    assert list(record["details"]["ifid4"]["classes"]) == ["2", "0"]
    assert record["results"]["ifid4"] == sum(record["details"]["ifid4"]["classes"].values()) / 2

    assert main(["eval", cfg.run_dir, "--metrics", "acc64", "--cache", str(tmp_path / "evalcache"),
                 "--no-progress"]) == 0  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert record["extractor"] is None and calls == [1]  # acc alone: no feature extractor (no Inception weights)


def test_conf_of_an_unconditional_run(make_config, tmp_path, capsys, monkeypatch) -> None:
    import pipeline.metrics.classifier as classifier_module
    from pipeline.data import KINDS, synthetic_dataset_url
    from pipeline.metrics.classifier import ClassifierRecipe

    monkeypatch.setattr(classifier_module, "DEFAULT_RECIPE", ClassifierRecipe(steps=20))  # plumbing, not quality
    # StyleGAN2 without classes on the labelled synthetic set, in its centred layout: eval finds that layout's set
    cfg = make_config("train.total_kimg=0.008", "data.synth.layout=centred")
    train(cfg)
    capsys.readouterr()
    cache, synth = cfg.data.resolved_cache_dir(), cfg.data.synth
    data = synthetic_dataset_url(cache, synth.n, 16, synth.seed, layout="centred")
    common = ["--cache", str(tmp_path / "evalcache"), "--no-progress"]

    assert main(["eval", "stats", data, "--metrics", "conf64", *common]) == 0  # the classifier, ahead
    (stats,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert stats["metric"] == "conf64" and stats["cache_hit"] is False
    assert 0 <= stats["heldout_confident"] <= 1

    assert main(["eval", cfg.run_dir, "--metrics", "conf64", *common]) == 0  # the run's own data
    record = json.loads(capsys.readouterr().out)
    results, details = record["results"], record["details"]["conf64"]
    assert list(results) == ["conf64", "conf64_reals", "conf64_spread", "conf64_spread_reals"]
    assert record["data"] == data and record["extractor"] is None  # no feature extractor loaded
    assert details["classifier"] == stats["classifier"] and details["class_names"] == list(KINDS)
    assert results["conf64"] == sum(details["counts"].values()) / 64
    assert results["conf64_reals"] == stats["heldout_confident"]
    assert results["conf64_reals"] == sum(details["counts_reals"].values()) / details["num_heldout"]
