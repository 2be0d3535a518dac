"""Two gloo processes on the CPU give the same features and metrics as one process, and a stop seen by one rank
abandons a feature pass on both without a hang."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import config_from_dict
from pipeline.families import get_family
from pipeline.metrics import EvalConfig, Evaluator, SmallExtractor, generated_features, real_features
from pipeline.metrics.features import Abandoned

METRICS = ["fid24_full", "fid20", "kid24_full", "pr24_full"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sampler(cfg_dict: dict[str, Any], g_state: dict[str, torch.Tensor]):
    """The family's sampler over a G with these weights (what each rank evaluates)."""
    cfg = config_from_dict(cfg_dict)
    family = get_family(cfg.family)
    spec = family.spec(cfg.model, cfg.data.resolution)
    G = family.build_generator(spec)
    G.load_state_dict(g_state)
    return family.make_sampler(G.eval().requires_grad_(False), family.build_conditioning(spec))


def _compute(shards: str, cache: str, cfg_dict: dict[str, Any], g_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    sampler = _sampler(cfg_dict, g_state)
    ext = SmallExtractor()
    ev = Evaluator(EvalConfig(metrics=METRICS, extractor="small", batch_size=5, cache_url=cache), shards, 16, cache)
    return {
        "metrics": ev.evaluate(sampler),
        "gen": generated_features(sampler, ext, 24, batch_size=4).features,
        "real": real_features(shards, ext, resolution=16, batch_size=6, num_real=30, keep_features=True).features,
        "real_full_sum": real_features(shards, ext, resolution=16, batch_size=6).stats.sum,
    }


def _worker(rank: int, world: int, port: int, args: tuple, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _compute(*args)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()  # neither rank tears the group down while the other may still use it
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(make_config, shards, tmp_path: Path) -> None:
    cfg = make_config()
    torch.manual_seed(0)
    family = get_family(cfg.family)
    G = family.build_generator(family.spec(cfg.model, cfg.data.resolution))
    args = (shards, str(tmp_path / "cache-dist"), cfg.to_dict(), G.state_dict())
    out = str(tmp_path / "dist.pt")
    mp.spawn(_worker, args=(2, _free_port(), args, out), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=False)  # our own file, written just above

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels, so the same float rounding
    try:
        single = _compute(shards, str(tmp_path / "cache-single"), cfg.to_dict(), G.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert distributed["gen"].shape == (24, 256) and distributed["real"].shape == (30, 256)
    torch.testing.assert_close(distributed["gen"], single["gen"], rtol=0, atol=0)
    torch.testing.assert_close(distributed["real"], single["real"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        torch.from_numpy(distributed["real_full_sum"]), torch.from_numpy(single["real_full_sum"]), rtol=1e-6, atol=1e-6
    )
    assert set(distributed["metrics"]) == set(single["metrics"])
    for k, v in single["metrics"].items():
        assert distributed["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-7), k


def _abandon_worker(rank: int, world: int, port: int, args: tuple, out: str) -> None:
    # A short timeout: ranks whose collectives do not match fail the test in seconds instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    shards, cfg_dict, g_state = args
    sampler = _sampler(cfg_dict, g_state)
    ext, outcome = SmallExtractor(), []
    passes = {
        "generated, rank 0 stops": lambda: generated_features(sampler, ext, 32, batch_size=4,
                                                              should_stop=lambda: rank == 0),
        "reals, rank 1 stops": lambda: real_features(shards, ext, resolution=16, batch_size=4,
                                                     should_stop=lambda: rank == 1),
        "generated, nobody stops": lambda: generated_features(sampler, ext, 8, batch_size=4, should_stop=lambda: False),
    }  # fmt: skip
    try:
        for name, run in passes.items():
            try:
                run()
                outcome.append(f"{name}: done")
            except Abandoned:
                outcome.append(f"{name}: abandoned")
            step = torch.ones(1)
            dist.all_reduce(step)  # the step boundary every rank goes to next: it must pair up
            outcome.append(f"step boundary {int(step.item())}")
        Path(f"{out}.{rank}").write_text("\n".join(outcome))
    finally:
        dist.destroy_process_group()


def test_a_stop_seen_by_one_rank_abandons_the_pass_on_every_rank(make_config, shards, tmp_path: Path) -> None:
    cfg = make_config()
    family = get_family(cfg.family)
    G = family.build_generator(family.spec(cfg.model, cfg.data.resolution))
    out = str(tmp_path / "outcome")
    mp.spawn(_abandon_worker, args=(2, _free_port(), (shards, cfg.to_dict(), G.state_dict()), out), nprocs=2)
    expected = [
        "generated, rank 0 stops: abandoned", "step boundary 2",
        "reals, rank 1 stops: abandoned", "step boundary 2",
        "generated, nobody stops: done", "step boundary 2",
    ]  # fmt: skip
    for rank in (0, 1):
        assert Path(f"{out}.{rank}").read_text().splitlines() == expected
