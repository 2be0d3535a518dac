"""A run's history survives its resumes: the CSV keeps every row of every attempt (also when a resumed attempt
logs a new column), TensorBoard's scalars and sample grids continue, and the logged step continues."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.train import train
from pipeline.train.loggers import AppendingCSVLogger

LOG_EVERY_STEP = ["train.log_every_kimg=0.008", "logger.csv=true", "train.checkpoint_every_kimg=0.016"]


def _rows(run_dir: str) -> list[dict[str, str]]:
    with open(f"{run_dir}/logs/metrics.csv") as fh:
        return list(csv.DictReader(fh))


EVAL_EVERY_2_STEPS = ["eval.metrics=[fid16_full]", "eval.extractor=small", "eval.every_kimg=0.016"]


def test_csv_keeps_every_attempt_and_a_new_column(make_config) -> None:
    first = make_config(*LOG_EVERY_STEP, *EVAL_EVERY_2_STEPS, "train.total_kimg=0.016")
    train(first)
    assert [r["kimg"] for r in _rows(first.run_dir) if r["kimg"]] == ["0.008", "0.016"]
    # The resumed attempt turns ADA on: a column the file did not have (Augment/p).
    second = make_config(*LOG_EVERY_STEP, *EVAL_EVERY_2_STEPS, "train.total_kimg=0.032", "augment.kind=ada")
    train(second, resume="auto")
    rows = _rows(second.run_dir)
    steps = [r for r in rows if r["kimg"]]
    assert [r["kimg"] for r in steps] == ["0.008", "0.016", "0.024", "0.032"]  # both attempts, in order
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3]  # the step continues
    assert [r["Augment/p"] for r in steps[:2]] == ["", ""] and all(r["Augment/p"] for r in steps[2:])
    assert all(r["Loss/D/loss"] for r in steps)  # the first attempt's values survived the rewrite
    # Evaluations sit at the step of the kimg they evaluated, in both attempts (not at a count that restarts).
    evaluations = [int(r["step"]) for r in rows if r["metrics/fid16_full"]]
    assert evaluations == [1, 3]
    with open(f"{second.run_dir}/metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 3]


def test_csv_logger_appends_and_widens(tmp_path: Path) -> None:
    logger = AppendingCSVLogger(str(tmp_path))
    logger.log_metrics({"a": 1.0, "epoch": 0}, step=1)
    logger.save()
    again = AppendingCSVLogger(str(tmp_path))  # a later attempt: a new logger, the same file
    again.log_metrics({"a": 2.0}, step=2)
    again.log_metrics({"a": 3.0, "b": 4.0}, step=3)
    again.finalize("success")
    assert (tmp_path / "logs" / "metrics.csv").read_text() == "step,a,b\n1,1.0,\n2,2.0,\n3,3.0,4.0\n"


def test_tensorboard_scalars_and_sample_grids_continue(make_config) -> None:
    common = [*LOG_EVERY_STEP, "logger.tensorboard=true", "train.samples_every_kimg=0.016"]
    train(make_config(*common, "train.total_kimg=0.016"))
    cfg = make_config(*common, "train.total_kimg=0.032")
    train(cfg, resume="auto")
    events = EventAccumulator(f"{cfg.run_dir}/logs/tensorboard", size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("Loss/G/loss")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("kimg")] == pytest.approx([0.008, 0.016, 0.024, 0.032])
    # Grids at the step whose kimg they show: 0 (before training), then kimg 0.016 (step 1) and 0.032 (step 3).
    grids = events.Images("samples/fakes")
    assert [e.step for e in grids] == [0, 1, 3] and events.Images("samples/reals")
    assert len(list(Path(cfg.run_dir, "logs", "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per attempt


def test_logged_statistics_are_means_over_the_steps_since_the_last_write(make_config, tmp_path: Path) -> None:
    # Oracle: the same run logged at every step. Logging never touches the RNG, so both runs train identically.
    r1_every_2 = ["loss.d_reg_interval=2", "train.total_kimg=0.032"]  # R1 on steps 0 and 2 of 4: half the steps
    every = make_config(*LOG_EVERY_STEP, *r1_every_2, f"run_dir={tmp_path / 'every'}")
    pairs = make_config(*LOG_EVERY_STEP, *r1_every_2, "train.log_every_kimg=0.016", f"run_dir={tmp_path / 'pairs'}")
    train(every)
    train(pairs)
    per_step, per_pair = _rows(every.run_dir), _rows(pairs.run_dir)
    assert [r["step"] for r in per_pair if r["Loss/D/loss"]] == ["1", "3"]
    for name in ("Loss/G/loss", "Loss/D/loss", "Loss/scores/fake"):
        values = [float(r[name]) for r in per_step if r[name]]
        assert len(values) == 4
        got = [float(r[name]) for r in per_pair if r[name]]
        assert got == pytest.approx([(values[0] + values[1]) / 2, (values[2] + values[3]) / 2], rel=1e-5), name
    # A lazily run phase's statistic is its mean over the steps it ran in, not diluted by the steps it skipped.
    r1 = {int(r["step"]): float(r["Loss/r1_penalty"]) for r in per_step if r["Loss/r1_penalty"]}
    assert sorted(r1) == [0, 2]
    got = [float(r["Loss/r1_penalty"]) for r in per_pair if r["Loss/r1_penalty"]]
    assert got == pytest.approx([r1[0], r1[2]], rel=1e-5)
