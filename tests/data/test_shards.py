"""Shard writing and the manifest: contents, checksums, atomicity, WebDataset compatibility, clear errors."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from pipeline.data import (
    DatasetError,
    Manifest,
    ShardWriter,
    read_manifest,
    verify_shards,
    write_synthetic_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    root = tmp_path_factory.mktemp("shards") / "ds"
    return root, write_synthetic_dataset(str(root), n=25, resolution=16, seed=0, samples_per_shard=10)


def test_manifest_describes_the_shards(dataset: tuple[Path, Manifest]) -> None:
    root, manifest = dataset
    assert manifest == read_manifest(str(root)) == read_manifest(f"file://{root}/manifest.json")
    assert manifest.format_version == 1
    assert manifest.num_samples == 25
    assert (manifest.resolution, manifest.num_classes, manifest.image_format) == (16, 6, "png")
    assert manifest.has_labels and manifest.has_captions
    assert manifest.class_names == ["circle", "square", "triangle", "diamond", "cross", "ring"]
    assert [s.name for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [10, 10, 5]
    for shard in manifest.shards:
        data = (root / shard.name).read_bytes()
        assert shard.bytes == len(data)
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json"] + [s.name for s in manifest.shards]
    raw = json.loads((root / "manifest.json").read_text())
    assert raw["num_samples"] == 25 and len(raw["shards"]) == 3
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_shard_members_follow_webdataset_conventions(dataset: tuple[Path, Manifest]) -> None:
    root, _ = dataset
    with tarfile.open(root / "shard-000002.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000020.cls", "000000020.png", "000000020.txt"]
        assert tar.extractfile("000000020.png").read().startswith(b"\x89PNG")  # type: ignore[union-attr]
        assert 0 <= int(tar.extractfile("000000020.cls").read().decode("ascii")) < 6  # type: ignore[union-attr]
    assert len(names) == 15
    # webdataset itself reads the shards, so other WebDataset tools can too.
    urls = [str(root / f"shard-{i:06d}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(25)]
    assert samples[7]["txt"].decode("utf-8").startswith("a ")


def test_verify_shards_detects_corruption(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_synthetic_dataset(str(root), n=6, resolution=8, seed=0, samples_per_shard=4)
    verify_shards(str(root))
    shard = root / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-000001\.tar"):
        verify_shards(str(root))


def test_missing_manifest_is_a_one_line_dataset_error(tmp_path: Path) -> None:
    url = str(tmp_path / "nothing-here")
    with pytest.raises(DatasetError) as info:
        read_manifest(url)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{url}/manifest.json" in message and "data.url" in message and "\n" not in message


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: "{not json", "not valid JSON"),
        (lambda m: json.dumps([1, 2]), "JSON object"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "resolution"}), "missing key 'resolution'"),
        (lambda m: json.dumps({**m, "resolution": "32"}), "resolution"),
        (lambda m: json.dumps({**m, "has_labels": 1}), "has_labels"),
        (lambda m: json.dumps({**m, "num_samples": 26}), "num_samples=26"),
        (lambda m: json.dumps({**m, "format_version": 99}), "newer"),
        (lambda m: json.dumps({**m, "image_format": "bmp"}), "image_format"),
        (lambda m: json.dumps({**m, "shards": [{"name": "x.tar"}]}), "shards"),
    ],
)
def test_malformed_manifest_is_a_dataset_error(
    tmp_path: Path, dataset: tuple[Path, Manifest], edit: Callable[[dict[str, Any]], str], reason: str
) -> None:
    _, manifest = dataset
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(edit(json.loads(manifest.to_json())))
    with pytest.raises(DatasetError, match=reason) as info:
        read_manifest(str(bad))
    assert str(bad / "manifest.json") in str(info.value) and "\n" not in str(info.value)


def test_unknown_manifest_keys_are_ignored(tmp_path: Path, dataset: tuple[Path, Manifest]) -> None:
    _, manifest = dataset
    (tmp_path / "manifest.json").write_text(json.dumps({**json.loads(manifest.to_json()), "source": "laion"}))
    assert read_manifest(str(tmp_path)) == manifest


def test_failed_write_leaves_no_partial_files_and_no_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(str(root), resolution=8, samples_per_shard=2) as w:
        for i in range(3):
            w.write(f"{i:09d}", b"png")
        raise RuntimeError("boom")
    assert sorted(p.name for p in root.iterdir()) == ["shard-000000.tar"]  # the complete shard only


def test_writer_rejects_inconsistent_samples(tmp_path: Path) -> None:
    w = ShardWriter(str(tmp_path / "ds"), resolution=8, num_classes=3, has_labels=True)
    with pytest.raises(ValueError, match=r"no '\.'"):
        w.write("a.b", b"png", label=0)
    with pytest.raises(ValueError, match="has_labels"):
        w.write("000000000", b"png")
    with pytest.raises(ValueError, match="outside"):
        w.write("000000000", b"png", label=3)
    with pytest.raises(ValueError, match="caption"):
        w.write("000000000", b"png", label=0, caption="not expected")
    w.write("000000000", b"png", label=2)
    manifest = w.close()
    assert manifest.num_samples == 1 and read_manifest(str(tmp_path / "ds")) == manifest


def test_writer_works_on_a_non_local_filesystem() -> None:
    url = "memory://ganpipe-test-shards/ds"
    with ShardWriter(url, resolution=8, has_captions=True, samples_per_shard=3, prefix="part") as w:
        for i in range(4):
            w.write(f"{i:09d}", b"img", caption=f"caption {i}")
    manifest = read_manifest(url)
    assert [s.name for s in manifest.shards] == ["part-000000.tar", "part-000001.tar"]
    assert not manifest.has_labels and manifest.num_classes == 0
    verify_shards(url)
