"""ShardDataset (random access for small data; training streams instead): types, content, pickling, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from pipeline.data import DatasetError, ShardDataset, ShardWriter, write_synthetic_dataset
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
        ShardDataset(str(tmp_path / "none"))
    root = tmp_path / "ds"
    write_synthetic_dataset(str(root), n=6, resolution=8, samples_per_shard=3)
    (root / "shard-000001.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-000001\.tar.*missing"):
        ShardDataset(str(root))
