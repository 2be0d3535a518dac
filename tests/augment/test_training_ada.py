"""ADA inside the training engine: finite losses, p logged and checkpointed, exact resume, p rising on overfit."""

from __future__ import annotations

import csv
import math

import torch

from pipeline.train import list_checkpoints, load_checkpoint, train

ADA = ["augment.kind=ada", "logger.csv=true", "train.log_every_kimg=0.008"]


def _log_rows(run_dir: str) -> list[dict[str, str]]:
    with open(f"{run_dir}/logs/metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_tiny_recipe_with_ada_trains_finite_and_checkpoints_p(make_config) -> None:
    cfg = make_config(*ADA, "train.total_kimg=0.048", "augment.p=0.5", "augment.ada_kimg=1")
    state = load_checkpoint(train(cfg).checkpoint)
    for net in ("G", "D"):
        assert all(torch.isfinite(v).all() for v in state[net].values())
    aug = state["augment"]
    assert set(aug) >= {"p", "signs_sum", "signs_count", "rt"}
    assert 0 <= float(aug["p"]) <= 1 and float(aug["p"]) != 0.5  # it was adjusted
    rows = _log_rows(cfg.run_dir)
    losses = [float(r["Loss/D/loss"]) for r in rows if r.get("Loss/D/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert [r["Augment/p"] for r in rows if r.get("Augment/p")]


def test_resume_mid_interval_is_exact_with_ada(make_config, tmp_path) -> None:
    # Batch 8, interval 4: the checkpoint at 56 images (step 7) holds sign sums not yet used for an adjustment.
    common = [*ADA, "augment.ada_kimg=0.5", "loss.d_reg_interval=4", "train.checkpoint_every_kimg=0.056"]
    full = make_config(*common, f"run_dir={tmp_path / 'full'}", "train.total_kimg=0.096")
    expected = load_checkpoint(train(full).checkpoint)
    first = make_config(*common, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.056")
    train(first)
    assert float(load_checkpoint(list_checkpoints(first.run_dir)[-1])["augment"]["signs_count"]) > 0
    second = make_config(*common, f"run_dir={tmp_path / 'split'}", "train.total_kimg=0.096")
    resumed = load_checkpoint(train(second, resume="auto").checkpoint)
    for key, value in expected["augment"].items():
        torch.testing.assert_close(resumed["augment"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    for net in ("G", "D"):
        for key, value in expected[net].items():
            torch.testing.assert_close(resumed[net][key], value, rtol=0, atol=1e-6, msg=f"{net}.{key}")


def test_p_rises_when_d_overfits_200_images(make_config) -> None:
    # 200 training images, and D given the upper hand so that it overfits within seconds: G nearly frozen, no R1,
    # a high D learning rate, 8x8 images for speed. With ada_kimg=1, each adjustment (4 steps x 8 images) moves p
    # by 0.032, so 200 steps could take p to 1.6 if D stayed sure of the reals; ADA holds r_t near 0.6 instead.
    cfg = make_config(
        *ADA,
        "data.synth.n=200",
        "data.resolution=8",
        "train.total_kimg=1.6",
        "augment.ada_kimg=1",
        "optim.d_lr=0.005",
        "optim.g_lr=0.000001",
        "loss.r1_gamma=0",
    )
    state = load_checkpoint(train(cfg).checkpoint)
    rows = [r for r in _log_rows(cfg.run_dir) if r.get("Augment/p")]
    p = [float(r["Augment/p"]) for r in rows]
    rt = [float(r["Augment/rt"]) for r in rows]
    quarter = len(p) // 4
    assert sum(rt[-quarter:]) / quarter > 0.5  # D stays confident on (augmented) reals...
    assert float(state["augment"]["p"]) > 0.3  # ...so p went up from 0...
    assert sum(p[-quarter:]) > 3 * sum(p[:quarter])  # ...steadily, not by one lucky adjustment
    assert all(math.isfinite(v) for v in p)


def test_diffaugment_trains_finite_and_logs_rt(make_config) -> None:
    cfg = make_config(*ADA[1:], "augment.kind=diffaugment", "train.total_kimg=0.016")
    state = load_checkpoint(train(cfg).checkpoint)
    assert all(torch.isfinite(v).all() for v in state["D"].values())
    assert "p" not in state["augment"] and "rt" in state["augment"]
    assert [r["Augment/rt"] for r in _log_rows(cfg.run_dir) if r.get("Augment/rt")]


def test_unshrunk_tiny_recipe_with_ada_trains_finite(tmp_path) -> None:
    """The tiny recipe's own 32x32 model and batch (only the dataset size and length cut), ADA at p = 0.5."""
    from pipeline.config import load_config
    from tests.conftest import TINY_RECIPE

    cfg = load_config(
        TINY_RECIPE,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.synth.n=64",
            "train.total_kimg=0.064",
            "train.progress_bar=false",
            "eval.metrics=[]",
            "augment.kind=ada",
            "augment.p=0.5",
        ],
    )
    state = load_checkpoint(train(cfg).checkpoint)
    for net in ("G", "D", "G_ema"):
        assert all(torch.isfinite(v).all() for v in state[net].values()), net
    assert float(state["augment"]["signs_count"]) > 0 or float(state["augment"]["p"]) != 0.5
