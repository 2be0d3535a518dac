"""A run dir and an export on object storage behave as on local disk: checkpoints written, found and resumed
exactly on S3 (moto on 127.0.0.1) and on memory://, exports written there and sampled from there; and a wandb
run (offline) continues under the same id when its run is resumed."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import list_checkpoints, load_checkpoint
from pipeline.export import export_generator, load_sampler
from pipeline.train import train


def _states_equal(a: dict, b: dict) -> None:
    """Networks, every optimizer tensor, counters, data position and RNG state: all bit for bit."""
    for net in ("G", "D", "G_ema"):
        for key, value in a[net].items():
            assert torch.equal(b[net][key], value), f"{net}.{key}"
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"], strict=True):
        for idx, state in opt_a["state"].items():
            for name, value in state.items():
                assert torch.equal(opt_b["state"][idx][name], value), f"optimizer state {idx}.{name}"
    assert a["counters"] == b["counters"] and a["data"]["stream"] == b["data"]["stream"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.fixture
def local_reference(make_config, tmp_path):
    """The uninterrupted local run that the remote ones must equal."""
    cfg = make_config("train.total_kimg=0.032", "train.checkpoint_every_kimg=0.016", f"run_dir={tmp_path / 'local'}")
    return load_checkpoint(train(cfg).checkpoint)


@pytest.mark.parametrize("store", ["s3", "memory"])
def test_remote_run_dir_checkpoints_resumes_exactly_and_exports(
    store: str, make_config, local_reference, tmp_path, request
) -> None:
    root = request.getfixturevalue("s3_bucket") if store == "s3" else f"memory://ganpipe-{os.getpid()}-{store}"
    run_dir = f"{root}/run"
    common = ["train.checkpoint_every_kimg=0.016", f"run_dir={run_dir}"]
    first = train(make_config(*common, "train.total_kimg=0.016"))
    assert first.checkpoint == f"{run_dir}/checkpoints/ckpt-000000000016.pt"
    resumed = train(make_config(*common, "train.total_kimg=0.032"), resume="auto")
    assert [u.rsplit("/", 1)[1] for u in list_checkpoints(run_dir)] == ["ckpt-000000000016.pt", "ckpt-000000000032.pt"]
    _states_equal(local_reference, load_checkpoint(resumed.checkpoint))

    export = f"{root}/export"
    export_generator(run_dir, export)
    from_remote = load_sampler(export).generate([0, 1, 2])
    from_local = load_sampler(str(tmp_path / "local")).generate([0, 1, 2])
    assert torch.equal(from_remote, from_local)


def test_wandb_offline_run_continues_under_the_same_id(make_config, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["logger.wandb.project=ganpipe-test", "train.log_every_kimg=0.008"]
    cfg = make_config(*common, "train.total_kimg=0.016")
    train(cfg)
    id_file = Path(cfg.run_dir, "wandb_run_id.txt")
    run_id = id_file.read_text().strip()
    train(make_config(*common, "train.total_kimg=0.032"), resume="auto")
    assert id_file.read_text().strip() == run_id
    attempts = sorted(glob.glob(f"{cfg.run_dir}/wandb/offline-run-*"))
    assert len(attempts) == 2 and all(a.endswith(f"-{run_id}") for a in attempts)  # both attempts, one run id
