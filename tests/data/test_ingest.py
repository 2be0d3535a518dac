"""`ganpipe data shards`: layouts, determinism, idempotent re-runs, unreadable sources; `ganpipe data inspect`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DatasetError, ShardDataset, read_manifest, verify_shards
from pipeline.data.ingest import ShardsOptions, write_shards
from pipeline.data.inspect import inspect_dataset

REPO = Path(__file__).resolve().parents[2]
OPTS = ShardsOptions(resolution=16, samples_per_shard=4, progress=False, image_format="png")


def _img(path: Path, w: int = 24, h: int = 20, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[:, : w // 2] = 255 - value
    Image.fromarray(arr).save(path)


def _folder(root: Path, n: int = 10) -> Path:
    for i in range(n):
        _img(root / f"sub{i % 2}" / f"img{i:02d}.png", value=i * 20)
    return root


def test_folder_layout_deterministic_crop_and_idempotent(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    a = write_shards(str(src), str(tmp_path / "a"), "folder", OPTS)
    b = write_shards(str(src), str(tmp_path / "b"), "folder", OPTS)
    assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards]
    assert a.manifest.num_samples == 10 and len(a.manifest.shards) == 3 and not a.manifest.has_labels
    assert [ref.rsplit("/", 1)[-1] for ref, _ in a.skipped] == ["broken.jpg"]
    assert "broken.jpg" in (tmp_path / "a" / "report.json").read_text()
    verify_shards(str(tmp_path / "a"))
    ds = ShardDataset(str(tmp_path / "a"))
    assert ds[0]["image"].shape == (3, 16, 16)
    # Re-running keeps complete shards; a damaged one is rewritten.
    again = write_shards(str(src), str(tmp_path / "a"), "folder", OPTS)
    assert again.written == [] and len(again.kept) == 3
    shard = tmp_path / "a" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-100])
    fixed = write_shards(str(src), str(tmp_path / "a"), "folder", OPTS)
    assert fixed.written == ["shard-000001.tar"] and fixed.manifest == a.manifest
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "c"), "folder", OPTS)


def test_an_out_folder_holds_one_dataset(tmp_path: Path) -> None:
    src, out = _folder(tmp_path / "src"), tmp_path / "out"
    first = write_shards(str(src), str(out), "folder", OPTS)
    with pytest.raises(DatasetError, match=r"holds a dataset written with resolution=16, not 32: .*--overwrite"):
        write_shards(str(src), str(out), "folder", dataclasses.replace(OPTS, resolution=32))
    assert read_manifest(str(out)) == first.manifest  # refused: nothing was touched
    replaced = write_shards(str(src), str(out), "folder", dataclasses.replace(OPTS, resolution=32, overwrite=True))
    assert replaced.manifest.resolution == 32 and len(replaced.written) == 3
    assert sorted(p.name for p in out.glob("*.tar")) == [s.name for s in replaced.manifest.shards]
    assert write_shards(str(src), str(out), "folder", dataclasses.replace(OPTS, resolution=32)).written == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's files")
    (foreign / "other-000000.tar").write_text("someone else's tar")
    with pytest.raises(DatasetError, match="is not empty and was not written by `ganpipe data shards`"):
        write_shards(str(src), str(foreign), "folder", OPTS)
    written = write_shards(str(src), str(foreign), "folder", dataclasses.replace(OPTS, overwrite=True))
    assert len(written.written) == 3
    assert (foreign / "notes.txt").exists() and (foreign / "other-000000.tar").exists()  # --overwrite deleted nothing
    # Replacing a ganpipe dataset deletes its own files only, and a relative path is the same source.
    (out / "mine.txt").write_text("kept")
    again = write_shards(os.path.relpath(src), str(out), "folder", dataclasses.replace(OPTS, resolution=32))
    assert again.written == []
    write_shards(str(src), str(out), "folder", dataclasses.replace(OPTS, resolution=16, overwrite=True))
    assert (out / "mine.txt").exists()
    # A dataset of an earlier ganpipe (no settings record) is ours: refused, then replaced with --overwrite.
    (out / "_progress" / "settings.json").unlink()
    with pytest.raises(DatasetError, match="written by an earlier ganpipe"):
        write_shards(str(src), str(out), "folder", OPTS)


def test_classes_layout_with_and_without_classes_json(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", 6)
    report = write_shards(str(src), str(tmp_path / "out"), "classes", OPTS)
    m = report.manifest
    assert m.has_labels and m.num_classes == 2 and m.class_names == ["sub0", "sub1"]
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == {"sub0": 0, "sub1": 1}
    (src / "classes.json").write_text(json.dumps({"sub0": 1, "sub1": 0}))
    m2 = write_shards(str(src), str(tmp_path / "out2"), "classes", OPTS).manifest
    assert m2.class_names == ["sub1", "sub0"]
    summary = inspect_dataset(str(tmp_path / "out2"))
    assert summary["classes"] == {"sub1": 3, "sub0": 3} and summary["good"] == 6


def test_captions_from_txt_and_csv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        _img(src / f"{i}.png", value=i)
        (src / f"{i}.txt").write_text(f"caption {i} é")
    m = write_shards(str(src), str(tmp_path / "out"), "captions", OPTS).manifest
    assert m.has_captions and m.num_samples == 3
    captions = sorted(ShardDataset(str(tmp_path / "out"))[i]["caption"] for i in range(3))
    assert captions == ["caption 0 é", "caption 1 é", "caption 2 é"]
    (src / "table.csv").write_text("path,caption\n0.png,zero\n1.png,one\nmissing.png,gone\n")
    report = write_shards(str(src / "table.csv"), str(tmp_path / "csv"), "captions", OPTS)
    assert report.manifest.num_samples == 2 and len(report.skipped) == 1
    with pytest.raises(DatasetError, match="caption"):
        (src / "bad.csv").write_text("file,label\n0.png,1\n")
        write_shards(str(src / "bad.csv"), str(tmp_path / "bad"), "captions", OPTS)


def test_nvlabs_zip(tmp_path: Path) -> None:
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        labels = []
        for i in range(5):
            name = f"00000/img{i:08d}.png"
            _img(tmp_path / "tmp.png", 16, 16, value=i * 30)
            zf.write(tmp_path / "tmp.png", name)
            labels.append([name, i % 3])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    m = write_shards(str(zpath), str(tmp_path / "out"), "nvlabs-zip", OPTS).manifest
    assert m.has_labels and m.num_classes == 3 and m.num_samples == 5
    ds = ShardDataset(str(tmp_path / "out"))
    assert sorted(int(ds[i]["label"]) for i in range(5)) == [0, 0, 1, 1, 2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_cli_shards_and_inspect(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", 8)
    out = tmp_path / "out"
    proc = _cli(
        "data",
        "shards",
        str(src),
        "--out",
        str(out),
        "--resolution",
        "16",
        "--samples-per-shard",
        "3",
        "--workers",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 images in 3 shards" in proc.stdout
    assert read_manifest(str(out)).image_format == "jpg"
    (out / "shard-000001.tar").write_bytes(b"garbage" * 100)
    proc = _cli("data", "inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["good"] == 5 and summary["bad"] == 3 and summary["resolutions"] == {"16x16": 5}
    assert summary["worst_shards"] == [{"shard": "shard-000001.tar", "bad": 3}]
    proc = _cli("data", "inspect", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "manifest.json" in proc.stderr
