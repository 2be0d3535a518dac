"""ShardDataset, InfiniteSampler and build_train_loader: types, the stream's math, exact resume, RNG hygiene."""

from __future__ import annotations

import pickle
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    DatasetError,
    InfiniteSampler,
    ShardDataset,
    ShardWriter,
    build_train_loader,
    write_synthetic_dataset,
)
from pipeline.data.synth import encode_png, synthetic_sample

N = 40  # samples in the test dataset; small so that streams cross several epochs


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("loader") / "ds"
    write_synthetic_dataset(str(root), n=N, resolution=16, seed=5, samples_per_shard=16)
    return str(root)


def test_items_have_the_documented_types_and_content(url: str) -> None:
    ds = ShardDataset(url)
    assert len(ds) == N and ds.resolution == 16 and ds.num_classes == 6 and ds.manifest.num_samples == N
    item = ds[17]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    assert item["label"].dtype == torch.int64 and item["label"].shape == ()
    image, spec = synthetic_sample(5, 17, 16)
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1))  # lossless round trip
    assert int(item["label"]) == spec.label and item["caption"] == spec.caption and item["key"] == "000000017"
    flipped = ds[(17, True)]
    assert torch.equal(flipped["image"], item["image"].flip(-1)) and not torch.equal(flipped["image"], item["image"])
    assert torch.equal(ds[(17, False)]["image"], item["image"])
    assert ds[-1]["key"] == f"{N - 1:09d}"
    raw = ds.read_raw(17)  # one sample's members and the tar headers between them, nothing more
    assert spec.caption.encode() in raw and b"000000016" not in raw and b"000000018" not in raw
    assert len(raw) < len(encode_png(image)) + len(spec.caption) + 3 * 1024
    with pytest.raises(IndexError):
        ds[N]


def test_unlabelled_uncaptioned_dataset(tmp_path: Path) -> None:
    with ShardWriter(str(tmp_path), resolution=8, samples_per_shard=2) as w:
        for i in range(3):
            w.write(f"{i:09d}", encode_png(synthetic_sample(0, i, 8)[0]))
    ds = ShardDataset(str(tmp_path))
    item = ds[2]
    assert int(item["label"]) == -1 and item["label"].dtype == torch.int64 and item["caption"] == ""
    assert item["image"].shape == (3, 8, 8)


def test_dataset_pickles_after_reading(url: str) -> None:
    ds = ShardDataset(url)
    before = ds[3]
    assert ds._files  # a handle is open now...
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._files  # ...and does not travel to worker processes
    assert torch.equal(clone[3]["image"], before["image"])


def test_missing_manifest_and_shard_give_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"manifest\.json"):
        build_train_loader(str(tmp_path / "none"), batch_size=4, seed=0)
    root = tmp_path / "ds"
    write_synthetic_dataset(str(root), n=6, resolution=8, samples_per_shard=3)
    (root / "shard-000001.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-000001\.tar.*missing"):
        ShardDataset(str(root))


def _take(sampler: InfiniteSampler, n: int) -> list[tuple[int, bool]]:
    return list(islice(iter(sampler), n))


def test_each_epoch_is_a_fresh_permutation() -> None:
    stream = [i for i, _ in _take(InfiniteSampler(N, seed=1), 3 * N)]
    epochs = [stream[k * N : (k + 1) * N] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(N))
    assert stream != [i for i, _ in _take(InfiniteSampler(N, seed=2), 3 * N)]


def test_ranks_partition_the_global_stream() -> None:
    world, per_rank = 3, 50  # 150 positions: crosses epoch boundaries at different points per rank
    glob = _take(InfiniteSampler(N, seed=4, xflip=True), world * per_rank)
    ranks = [list(InfiniteSampler(N, seed=4, rank=r, world_size=world, length=per_rank, xflip=True)) for r in range(3)]
    for r in range(world):
        assert ranks[r] == glob[r::world]
    # Within an epoch no two ranks see the same sample.
    first_epoch = [set(i for i, _ in ranks[r][: N // world]) for r in range(world)]
    assert not (first_epoch[0] & first_epoch[1]) and not (first_epoch[1] & first_epoch[2])


@pytest.mark.parametrize(("rank", "world", "k"), [(0, 1, 0), (0, 1, 37), (1, 2, 23), (2, 3, 61)])
def test_resume_yields_exactly_the_tail(rank: int, world: int, k: int) -> None:
    full = list(InfiniteSampler(N, seed=9, rank=rank, world_size=world, length=100, xflip=True))
    resumed = InfiniteSampler(N, seed=9, rank=rank, world_size=world, start=k, length=100 - k, xflip=True)
    assert len(resumed) == 100 - k
    assert list(resumed) == full[k:]
    assert list(resumed) == full[k:]  # re-iterating restarts at `start`


def test_xflip_bits() -> None:
    assert not any(f for _, f in _take(InfiniteSampler(N, seed=0), 2 * N))
    flips = [f for _, f in _take(InfiniteSampler(N, seed=0, xflip=True), 10 * N)]
    assert 0.35 < np.mean(flips) < 0.65
    assert flips == [f for _, f in _take(InfiniteSampler(N, seed=0, xflip=True), 10 * N)]
    # Flipping does not change which samples are drawn.
    assert [i for i, _ in _take(InfiniteSampler(N, seed=0, xflip=True), 2 * N)] == [
        i for i, _ in _take(InfiniteSampler(N, seed=0), 2 * N)
    ]


def test_endless_sampler_has_no_length() -> None:
    with pytest.raises(TypeError):
        len(InfiniteSampler(N, seed=0))
    assert len(_take(InfiniteSampler(N, seed=0), 5 * N)) == 5 * N
    with pytest.raises(ValueError):
        InfiniteSampler(N, seed=0, rank=2, world_size=2)


def _batches(loader: torch.utils.data.DataLoader) -> list[dict]:
    return list(loader)


def test_loader_batches(url: str) -> None:
    loader = build_train_loader(url, batch_size=8, seed=3, num_samples=60, xflip=True)
    assert len(loader) == 7  # drop_last: 60 samples make 7 full batches
    batches = _batches(loader)
    assert len(batches) == 7
    b = batches[0]
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 3, 16, 16) and b["image"].is_contiguous()
    assert b["label"].dtype == torch.int64 and b["label"].shape == (8,)
    assert isinstance(b["caption"], list) and len(b["caption"]) == 8 and all(isinstance(c, str) for c in b["caption"])
    assert b["key"] == [f"{i:09d}" for i, _ in _take(InfiniteSampler(N, seed=3, xflip=True), 8)]


def test_loader_resume_matches_uninterrupted_run_and_spares_global_rng(url: str) -> None:
    torch.manual_seed(123)
    np.random.seed(123)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    full = _batches(build_train_loader(url, batch_size=4, seed=7, num_samples=48, xflip=True, rank=1, world_size=2))
    resumed = _batches(
        build_train_loader(url, batch_size=4, seed=7, start=20, num_samples=28, xflip=True, rank=1, world_size=2)
    )
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert len(full) == 12 and len(resumed) == 7
    for a, b in zip(full[5:], resumed, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_workers_give_the_same_batches_and_spare_global_rng(url: str) -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = build_train_loader(url, batch_size=5, seed=2, num_samples=60, xflip=True, num_workers=2)
    assert loader.persistent_workers
    parallel = _batches(loader)
    again = _batches(loader)  # a second pass over the persistent workers starts over at `start`
    assert torch.equal(torch.get_rng_state(), state)
    serial = _batches(build_train_loader(url, batch_size=5, seed=2, num_samples=60, xflip=True))
    assert len(parallel) == len(serial) == len(again) == 12
    for a, b, c in zip(parallel, serial, again, strict=True):
        assert a["key"] == b["key"] == c["key"] and torch.equal(a["image"], b["image"])
