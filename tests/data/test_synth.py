"""The synthetic dataset: determinism, captions that describe the pixels, and the race-safe cache."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import pipeline.data.synth as synth
from pipeline.data import KINDS, ShardDataset, ensure_synthetic_dataset, read_manifest, write_synthetic_dataset
from pipeline.data.synth import BACKGROUND_COLORS, PALETTE, synthetic_sample

CAPTION_RE = re.compile(
    r"^a (small|large) (\w+) (\w+) at the (top left|top right|top|bottom left|bottom right|bottom|left|right|center) "
    r"on a (\w+) background$"
)


def _items(url: str) -> list[tuple[str, bytes, int, str]]:
    ds = ShardDataset(url)
    return [
        (s["key"], s["image"].numpy().tobytes(), int(s["label"]), s["caption"]) for s in (ds[i] for i in range(len(ds)))
    ]


def test_same_seed_gives_identical_shards_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_dataset(str(tmp_path / "a"), n=40, resolution=16, seed=3, samples_per_shard=16)
    b = write_synthetic_dataset(str(tmp_path / "b"), n=40, resolution=16, seed=3, samples_per_shard=16)
    c = write_synthetic_dataset(str(tmp_path / "c"), n=40, resolution=16, seed=4, samples_per_shard=16)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / "shard-000000.tar").read_bytes() == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    items_a, items_c = _items(str(tmp_path / "a")), _items(str(tmp_path / "c"))
    assert items_a == _items(str(tmp_path / "b"))
    assert all(x != y for x, y in zip(a.shards, c.shards, strict=True))
    differing_images = sum(x[1] != y[1] for x, y in zip(items_a, items_c, strict=True))
    assert differing_images >= 38  # two seeds may coincide on an image now and then, not on most
    assert [x[3] for x in items_a] != [x[3] for x in items_c]


def test_samples_do_not_depend_on_sharding_or_count(tmp_path: Path) -> None:
    write_synthetic_dataset(str(tmp_path / "small_shards"), n=30, resolution=16, seed=1, samples_per_shard=7)
    write_synthetic_dataset(str(tmp_path / "one_shard"), n=30, resolution=16, seed=1, samples_per_shard=1000)
    write_synthetic_dataset(str(tmp_path / "longer"), n=45, resolution=16, seed=1, samples_per_shard=1000)
    small = _items(str(tmp_path / "small_shards"))
    assert len(read_manifest(str(tmp_path / "small_shards")).shards) == 5
    assert small == _items(str(tmp_path / "one_shard"))
    assert small == _items(str(tmp_path / "longer"))[:30]
    assert [k for k, *_ in small] == [f"{i:09d}" for i in range(30)]


def _nearest(rgb: np.ndarray, names: tuple[str, ...] | list[str]) -> str:
    return min(names, key=lambda n: float(np.linalg.norm(rgb.astype(float) - PALETTE[n])))


def _check_kind(kind: str, mask: np.ndarray) -> None:
    """Kind-specific facts about the pixels that are mostly shape-coloured, inside their bounding box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    fill = box.mean()
    mid_row, mid_col = box[h // 2], box[:, w // 2]
    if kind == "square":
        assert fill > 0.9 and abs(h - w) <= 1
    elif kind == "circle":
        assert 0.7 < fill < 0.88 and mid_row.all() and not box[0, 0] and not box[-1, -1]
    elif kind == "ring":
        assert not box[h // 2, w // 2] and mid_row[:2].all() and not box[0, 0]
    elif kind == "triangle":
        assert box[0].sum() < box[-1].sum() / 3 and 0.4 < fill < 0.65
    elif kind == "diamond":
        assert box[0].sum() < mid_row.sum() / 3 and box[-1].sum() < mid_row.sum() / 3 and 0.4 < fill < 0.65
    elif kind == "cross":
        assert box[h // 2, w // 2] and mid_row.all() and mid_col.all()
        assert not box[0, 0] and not box[0, -1] and not box[-1, 0] and not box[-1, -1]
    else:
        raise AssertionError(f"unexpected kind {kind}")


def _check_axis(word: str, low: str, high: str, c: float) -> None:
    if word == low:
        assert c < 0.45, (word, c)
    elif word == high:
        assert c > 0.55, (word, c)
    else:
        assert abs(c - 0.5) < 0.1, (word, c)


@pytest.mark.parametrize("layout", ["grid", "centred"])
@pytest.mark.parametrize("index", range(48))
def test_caption_and_label_describe_the_pixels(index: int, layout: str) -> None:
    res = 64
    image, spec = synthetic_sample(7, index, res, layout)
    m = CAPTION_RE.match(spec.caption)
    assert m, spec.caption
    size, color, kind, position, background = m.groups()
    assert spec.label == KINDS.index(kind)
    assert color != background and color in PALETTE and background in BACKGROUND_COLORS
    fg, bg = np.array(PALETTE[color], float), np.array(PALETTE[background], float)
    px = image.reshape(-1, 3).astype(float)
    # A pixel belongs to the shape when it is closer to the caption's shape colour than to its background.
    mask = (np.linalg.norm(px - fg, axis=1) < np.linalg.norm(px - bg, axis=1)).reshape(res, res)
    assert mask.any()
    ys, xs = np.nonzero(mask)
    # Position means the bounding box's centre (a triangle's centroid sits low in its box).
    cx, cy = (xs.min() + xs.max() + 1) / 2 / res, (ys.min() + ys.max() + 1) / 2 / res
    words = position.split()
    vertical = next((w for w in words if w in ("top", "bottom")), "middle")
    horizontal = next((w for w in words if w in ("left", "right")), "middle")
    _check_axis(vertical, "top", "bottom", cy)
    _check_axis(horizontal, "left", "right", cx)
    width = (xs.max() - xs.min() + 1) / res
    assert width <= 0.41 if size == "small" else width >= 0.44
    if layout == "centred":
        assert size == "large" and position == "center"
    if kind != "ring":  # the caption's colour is drawn exactly at the shape's centre
        assert _nearest(image[int(cy * res), int(cx * res)], list(PALETTE)) == color
    # The image corner farthest from the shape shows the caption's background colour.
    corner = image[-1 if cy < 0.5 else 0, -1 if cx < 0.5 else 0]
    assert _nearest(corner, BACKGROUND_COLORS) == background
    _check_kind(kind, mask)


def test_attribute_coverage() -> None:
    specs = [synthetic_sample(0, i, 8)[1] for i in range(400)]
    assert {s.kind for s in specs} == set(KINDS)
    assert {s.size for s in specs} == {"small", "large"}
    assert {(s.row, s.col) for s in specs} == {(r, c) for r in range(3) for c in range(3)}
    assert len({s.color for s in specs}) >= 6 and len({s.background for s in specs}) >= 5


def test_centred_layout_moves_and_enlarges_the_same_shapes(tmp_path: Path) -> None:
    for i in range(200):
        grid, centred = synthetic_sample(0, i, 8)[1], synthetic_sample(0, i, 8, "centred")[1]
        same = ("kind", "color", "background", "gradient")
        assert [getattr(centred, k) for k in same] == [getattr(grid, k) for k in same]
        assert centred.size == "large" and (centred.row, centred.col) == (1, 1)
    assert {synthetic_sample(0, i, 8, "centred")[1].kind for i in range(100)} == set(KINDS)
    # Its own cache folder: the grid layout's folder name is the one made before layouts existed.
    grid_url = ensure_synthetic_dataset(str(tmp_path), n=6, resolution=8, seed=0)
    centred_url = ensure_synthetic_dataset(str(tmp_path), n=6, resolution=8, seed=0, layout="centred")
    assert grid_url.endswith("/synth/r8-n6-s0") and centred_url.endswith("/synth/r8-n6-s0-centred")
    assert _items(grid_url) != _items(centred_url)
    with pytest.raises(ValueError, match="layout='diagonal' is unknown: use one of grid, centred"):
        synthetic_sample(0, 0, 8, "diagonal")


def test_works_on_any_fsspec_url() -> None:
    url = "memory://ganpipe-test-synth/ds"
    manifest = write_synthetic_dataset(url, n=12, resolution=8, seed=0, samples_per_shard=5)
    assert [s.num_samples for s in manifest.shards] == [5, 5, 2]
    ds = ShardDataset(url)
    assert len(ds) == 12 and ds[11]["image"].shape == (3, 8, 8)


def test_ensure_creates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = ensure_synthetic_dataset(str(tmp_path), n=10, resolution=8, seed=2)
    assert url == f"{tmp_path}/synth/r8-n10-s2"
    assert read_manifest(url).num_samples == 10
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == ["r8-n10-s2"]  # no temp folder left

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached dataset must be reused, not re-written")

    monkeypatch.setattr(synth, "write_synthetic_dataset", fail)
    assert ensure_synthetic_dataset(str(tmp_path), n=10, resolution=8, seed=2) == url


def test_ensure_loses_a_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "synth" / "r8-n10-s0"
    real_write = synth.write_synthetic_dataset

    def write_then_lose_race(out_url: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        manifest = real_write(out_url, *args, **kwargs)
        real_write(str(final), *args, **kwargs)  # another process finishes first
        (final / "marker").write_text("winner")
        return manifest

    monkeypatch.setattr(synth, "write_synthetic_dataset", write_then_lose_race)
    url = ensure_synthetic_dataset(str(tmp_path), n=10, resolution=8, seed=0)
    assert (final / "marker").read_text() == "winner"  # the winner's folder was kept, not replaced
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == ["r8-n10-s0"]
    assert len(ShardDataset(url)) == 10


def test_ensure_replaces_a_stale_folder_and_survives_concurrent_callers(tmp_path: Path) -> None:
    stale = tmp_path / "synth" / "r8-n20-s1"
    stale.mkdir(parents=True)
    (stale / "shard-000000.tar").write_bytes(b"half a shard")  # an interrupted writer, no manifest
    with ThreadPoolExecutor(4) as pool:
        urls = list(pool.map(lambda _: ensure_synthetic_dataset(str(tmp_path), n=20, resolution=8, seed=1), range(4)))
    assert len(set(urls)) == 1
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == ["r8-n20-s1"]
    assert len(ShardDataset(urls[0])) == 20
