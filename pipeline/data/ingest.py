"""Writing shards from user data: what `ganpipe data shards SRC --out URL --layout ...` runs.

Layouts (`SRC` is any fsspec URL):
    folder      every image under SRC, recursively; unlabelled
    classes     one subfolder per class (ImageNet style); `SRC/classes.json` ({"name": id}) fixes the ids,
                otherwise the sorted folder names get 0, 1, ... (written to `OUT/classes.json`)
    captions    images with a same-named `.txt` beside them; or SRC is a CSV/TSV (or parquet, with pyarrow)
                table with an image column (`path`, `url`, `image`, `file` or `filename`: a path relative to the
                table, or a URL) and a caption column (`caption` or `text`)
    nvlabs-zip  NVIDIA's dataset_tool zip: images plus `dataset.json` {"labels": [[name, class], ...] | null}

Contract:
- Deterministic: sources are sorted, shuffled with `seed` into shards of a fixed number of samples (from
  `samples_per_shard`, or estimated from `shard_size` bytes by encoding the first few images), keyed by their
  index in the sorted list. The same inputs and options give byte-identical shards.
- Idempotent: a shard whose progress record (`OUT/_progress/NAME.json`) matches its plan and whose file matches
  the recorded size and sha256 is kept, not re-encoded; a killed run resumes where it stopped.
- One dataset per `OUT`: the settings of a run (source, layout, resolution, transform, format, quality, shard
  size, seed) are recorded in `OUT/_progress/settings.json`; a run into an `OUT` that holds another dataset, or
  files `ganpipe data shards` did not write, is refused in one line naming the first difference, unless
  `overwrite`: that removes the old dataset's shards, progress records and manifest first, and nothing else (in a
  folder of other files it deletes nothing).
- An unreadable source image is skipped and listed (reason included) in `OUT/report.json`, never fatal.
- `manifest.json` is written last, when every shard is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import re
import uuid
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
from PIL import Image, ImageOps
from webdataset import TarWriter

from pipeline.data.codec import encode_image
from pipeline.data.shards import Manifest, ShardInfo, _HashingFile, write_manifest
from pipeline.errors import DatasetError
from pipeline.storage import canonical_url, publish_atomic, sha256_of

log = logging.getLogger(__name__)

Layout = Literal["folder", "classes", "captions", "nvlabs-zip"]
LAYOUTS: tuple[str, ...] = ("folder", "classes", "captions", "nvlabs-zip")
SOURCE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_COLUMNS = ("path", "url", "image", "file", "filename")
_CAPTION_COLUMNS = ("caption", "text")
_ESTIMATE_SAMPLES = 32  # images encoded to estimate bytes per sample when sizing shards by bytes
_TAR_OVERHEAD = 3 * 512 + 512  # member headers and padding per sample, roughly


@dataclass(frozen=True)
class SourceItem:
    """One source image: `ref` is a URL/path, or a member name of `zip_url`."""

    ref: str
    label: int | None = None
    caption: str | None = None
    zip_url: str | None = None


@dataclass(frozen=True)
class ShardsOptions:
    resolution: int
    transform: Literal["center-crop", "resize"] = "center-crop"  # square crop then resize, or stretch
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 90  # jpg/webp
    shard_size: int = 256 << 20  # target bytes per shard (ignored when samples_per_shard is set)
    samples_per_shard: int | None = None
    workers: int = 1
    seed: int = 0
    prefix: str = "shard"
    progress: bool = True
    overwrite: bool = False  # replace another dataset (other settings) already in OUT

    def validate(self) -> None:
        if self.resolution < 1:
            raise DatasetError(f"--resolution {self.resolution} is invalid: give a positive size, e.g. 256")
        if self.transform not in ("center-crop", "resize"):
            raise DatasetError(f"--transform {self.transform!r} is invalid: use center-crop or resize")
        if self.image_format not in ("jpg", "png", "webp"):
            raise DatasetError(f"--format {self.image_format!r} is invalid: use jpg, png or webp")
        if not 1 <= self.quality <= 100:
            raise DatasetError(f"--quality {self.quality} is invalid: give 1..100")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise DatasetError(f"--samples-per-shard {self.samples_per_shard} is invalid: give a positive count")
        if self.shard_size < 1 << 16:
            raise DatasetError(f"--shard-size {self.shard_size} is too small: give at least 64 KiB")
        if self.workers < 1:
            raise DatasetError(f"--workers {self.workers} is invalid: give 1 or more")


@dataclass
class ShardsReport:
    manifest: Manifest
    written: list[str] = field(default_factory=list)  # shard names encoded by this run
    kept: list[str] = field(default_factory=list)  # complete shards from an earlier run, left as they were
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason) of unreadable images


@dataclass(frozen=True)
class _Listing:
    items: list[SourceItem]
    class_names: list[str] | None
    has_labels: bool
    has_captions: bool


# ------------------------------------------------------------------------------------------------------------
# Listing sources


def _is_image(path: str) -> bool:
    return path.lower().endswith(SOURCE_EXTENSIONS)


def _find(url: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.isdir(root):
            raise DatasetError(f"source {url!r} is not a folder: give the folder that holds the images")
        files = sorted(fs.find(root))
    except FileNotFoundError:
        raise DatasetError(f"source {url!r} does not exist: check the path") from None
    return fs, root.rstrip("/"), files


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def list_sources(src: str, layout: str) -> _Listing:
    """The sorted source items of `src` in `layout`; raises `DatasetError` when there is nothing to read."""
    if layout not in LAYOUTS:
        raise DatasetError(f"--layout {layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    if layout == "nvlabs-zip":
        listing = _list_zip(src)
    elif layout == "captions" and src.lower().endswith((".csv", ".tsv", ".parquet")):
        listing = _list_table(src)
    else:
        fs, root, files = _find(src)
        images = [f for f in files if _is_image(f)]
        if layout == "folder":
            listing = _Listing([SourceItem(_unstrip(fs, f)) for f in images], None, False, False)
        elif layout == "classes":
            listing = _list_classes(fs, root, images)
        else:
            present = set(files)
            items = []
            for f in images:
                txt = f.rsplit(".", 1)[0] + ".txt"
                caption = fs.cat_file(txt).decode("utf-8", errors="replace").strip() if txt in present else None
                items.append(SourceItem(_unstrip(fs, f), caption=caption))
            listing = _Listing(items, None, False, True)
    if not listing.items:
        raise DatasetError(f"no images found in {src!r} with --layout {layout}: check the path and layout")
    return listing


def _list_classes(fs: fsspec.AbstractFileSystem, root: str, images: list[str]) -> _Listing:
    by_class: dict[str, list[str]] = {}
    for f in images:
        rel = f[len(root) + 1 :]
        if "/" not in rel:
            continue  # an image beside the class folders belongs to no class
        by_class.setdefault(rel.split("/", 1)[0], []).append(f)
    mapping_path = f"{root}/classes.json"
    if fs.exists(mapping_path):
        try:
            mapping = {str(k): int(v) for k, v in json.loads(fs.cat_file(mapping_path)).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise DatasetError(f"{mapping_path!r} is not a JSON object of class name -> id ({e})") from None
        unknown = sorted(set(by_class) - set(mapping))
        if unknown:
            raise DatasetError(f"class folders {unknown[:5]} are not in {mapping_path!r}: add them or remove them")
    else:
        mapping = {name: i for i, name in enumerate(sorted(by_class))}
    ids = sorted(set(mapping.values()))
    if ids != list(range(len(ids))):
        raise DatasetError(f"class ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}")
    names = [""] * len(ids)
    for name, i in mapping.items():
        names[i] = name
    items = [SourceItem(_unstrip(fs, f), label=mapping[c]) for c in sorted(by_class) for f in by_class[c]]
    items.sort(key=lambda it: it.ref)
    return _Listing(items, names, True, False)


def _list_table(src: str) -> _Listing:
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    if src.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(
                "reading a parquet caption table needs pyarrow: pip install pyarrow, or use CSV/TSV"
            ) from None
        with fsspec.open(src, "rb") as fh:
            rows = pq.read_table(fh).to_pylist()
    else:
        try:
            with fsspec.open(src, "r", encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if src.lower().endswith(".tsv") else ","))
        except FileNotFoundError:
            raise DatasetError(f"caption table {src!r} does not exist: check the path") from None
    if not rows:
        return _Listing([], None, False, True)
    columns = {c.lower(): c for c in rows[0]}
    image_col = next((columns[c] for c in _IMAGE_COLUMNS if c in columns), None)
    caption_col = next((columns[c] for c in _CAPTION_COLUMNS if c in columns), None)
    if image_col is None or caption_col is None:
        raise DatasetError(
            f"caption table {src!r} has columns {list(rows[0])}: it needs one of {_IMAGE_COLUMNS} and one of "
            f"{_CAPTION_COLUMNS}"
        )
    items = []
    for row in rows:
        ref = str(row[image_col])
        if "://" not in ref and not ref.startswith("/"):
            ref = f"{base}/{ref}"
        items.append(SourceItem(ref, caption=str(row[caption_col] or "")))
    items.sort(key=lambda it: it.ref)
    return _Listing(items, None, False, True)


def _list_zip(src: str) -> _Listing:
    fs, path = fsspec.core.url_to_fs(src)
    if fs.isdir(path):
        raise DatasetError(
            f"--layout nvlabs-zip reads a dataset_tool .zip file, and {src!r} is a folder: pass the zip, or use "
            "--layout folder (or classes, captions) for a folder of images"
        )
    try:
        with fsspec.open(src, "rb") as fh, zipfile.ZipFile(fh) as zf:
            names = sorted(n for n in zf.namelist() if _is_image(n))
            meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else {}
    except FileNotFoundError:
        raise DatasetError(f"zip {src!r} does not exist: check the path") from None
    except (zipfile.BadZipFile, ValueError) as e:
        raise DatasetError(f"{src!r} is not a readable dataset_tool zip ({e}): re-create it") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    by_name = {str(n): int(c) for n, c in labels} if labels else {}
    has_labels = bool(by_name)
    items = [SourceItem(n, label=by_name.get(n) if has_labels else None, zip_url=src) for n in names]
    if has_labels:
        unlabelled = [it.ref for it in items if it.label is None]
        if unlabelled:
            raise DatasetError(f"{src!r}: dataset.json has no label for {unlabelled[:3]}: fix dataset.json")
    num_classes = max((it.label or 0 for it in items), default=-1) + 1 if has_labels else 0
    return _Listing(items, [str(i) for i in range(num_classes)] if has_labels else None, has_labels, False)


# ------------------------------------------------------------------------------------------------------------
# Encoding


_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: one open handle per zip


def _read_source(item: SourceItem) -> bytes:
    if item.zip_url is None:
        fs, path = fsspec.core.url_to_fs(item.ref)
        return fs.cat_file(path)
    zf = _ZIPS.get(item.zip_url)
    if zf is None:
        zf = _ZIPS[item.zip_url] = zipfile.ZipFile(fsspec.open(item.zip_url, "rb").open())
    return zf.read(item.ref)


def prepare_image(data: bytes, options: ShardsOptions) -> bytes:
    """Source bytes -> encoded RxR RGB image (EXIF orientation applied); raises on unreadable input."""
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    r = options.resolution
    if options.transform == "center-crop":
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if im.size != (r, r):
        im = im.resize((r, r), Image.Resampling.LANCZOS)
    return encode_image(np.asarray(im), options.image_format, options.quality)


@dataclass(frozen=True)
class _ShardPlan:
    name: str
    indices: list[int]  # index into the sorted source list (also the sample key)
    items: list[SourceItem]

    def digest(self, options: ShardsOptions) -> str:
        h = hashlib.sha256()
        fixed = (options.resolution, options.transform, options.image_format, options.quality)
        h.update(
            json.dumps(
                [fixed, [[i, dataclasses.astuple(it)] for i, it in zip(self.indices, self.items, strict=True)]]
            ).encode()
        )
        return h.hexdigest()


def _write_shard(out: str, plan: _ShardPlan, options: ShardsOptions) -> tuple[dict[str, Any], list[list[str]]]:
    """Encode and write one shard atomically (temporary name, then rename); runs in a worker process."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    tmp = f"{root}/{plan.name}.tmp-{uuid.uuid4().hex[:12]}"
    skipped: list[list[str]] = []
    count = 0
    with fs.open(tmp, "wb") as fh:
        hashing = _HashingFile(fh)
        tar = TarWriter(hashing, encoder=False, mtime=0, user="ganpipe", group="ganpipe")
        for index, item in zip(plan.indices, plan.items, strict=True):
            try:
                image = prepare_image(_read_source(item), options)
            except Exception as e:  # any unreadable source is reported, never fatal
                skipped.append([item.ref, f"{type(e).__name__}: {e}"])
                continue
            sample: dict[str, Any] = {"__key__": f"{index:09d}", options.image_format: image}
            if item.label is not None:
                sample["cls"] = str(item.label).encode("ascii")
            if item.caption is not None:
                sample["txt"] = item.caption.encode("utf-8")
            tar.write(sample)
            count += 1
        tar.close()
    fs.mv(tmp, f"{root}/{plan.name}")
    info = ShardInfo(plan.name, count, hashing.bytes, hashing.sha.hexdigest())
    return dataclasses.asdict(info), skipped


def _estimate_samples_per_shard(listing: _Listing, order: np.ndarray, options: ShardsOptions) -> int:
    sizes = []
    for i in order[:_ESTIMATE_SAMPLES]:
        try:
            sizes.append(len(prepare_image(_read_source(listing.items[int(i)]), options)))
        except Exception:  # an unreadable image is reported when its shard is written
            continue
    per_sample = (float(np.mean(sizes)) if sizes else 3.0 * options.resolution**2) + _TAR_OVERHEAD
    return max(1, int(options.shard_size // per_sample))


_OWN_FILES = ("_progress", "manifest.json", "report.json", "classes.json")


def _claim_out(fs: fsspec.AbstractFileSystem, root: str, out: str, settings: dict[str, Any], overwrite: bool) -> None:
    """Make `out` this run's: refuse another dataset's folder (see the module docstring), or with `overwrite` take
    it, deleting only what `ganpipe data shards` wrote there."""
    fs.invalidate_cache(root)
    entries = fs.ls(root, detail=False) if fs.exists(root) else []
    names = {entry.rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}
    known = _read_json(fs, f"{root}/_progress/settings.json")
    ours = known is not None or "_progress" in names or _read_json(fs, f"{root}/manifest.json") is not None
    if known is not None:
        difference = next((k for k in settings if known.get(k) != settings[k]), None)
    elif ours:
        difference = "settings"  # written by a ganpipe that kept no settings record
    else:
        difference = "contents" if entries else None
    if difference is not None and not overwrite:
        if difference == "contents":
            raise DatasetError(
                f"--out {out!r} is not empty and was not written by `ganpipe data shards`: choose an empty --out, or "
                "pass --overwrite to write into it anyway (nothing in it is deleted; files with a shard's name are "
                "replaced)"
            )
        if difference == "settings":
            raise DatasetError(
                f"--out {out!r} holds a dataset written by an earlier ganpipe, whose settings are not recorded: "
                "choose another --out, or pass --overwrite to replace it"
            )
        raise DatasetError(
            f"--out {out!r} holds a dataset written with {difference}={known[difference]!r}, not "
            f"{settings[difference]!r}: choose another --out, or pass --overwrite to replace it"
        )
    if difference is not None and ours:  # --overwrite: the old dataset goes, and nothing else
        manifest = _read_json(fs, f"{root}/manifest.json") or {}
        listed = {str(shard.get("name")) for shard in manifest.get("shards", []) if isinstance(shard, dict)}
        prefixes = {settings["prefix"], *([known["prefix"]] if known and "prefix" in known else [])}
        pattern = re.compile(rf"({'|'.join(re.escape(p) for p in prefixes)})-\d{{6}}\.tar")
        for name, entry in names.items():
            if name in _OWN_FILES or name in listed or pattern.fullmatch(name):
                fs.rm(entry, recursive=True)
        log.info("--overwrite: removed the dataset that was in %s", out)
    fs.makedirs(f"{root}/_progress", exist_ok=True)
    publish_atomic(f"{root}/_progress/settings.json", json.dumps(settings).encode(), fs=fs)


def write_shards(src: str, out: str, layout: str, options: ShardsOptions) -> ShardsReport:
    """Write `src` (in `layout`) as shards + manifest to `out`; see the module docstring."""
    options.validate()
    src = canonical_url(src)  # the same folder spelt two ways is the same source (settings, plans)
    listing = list_sources(src, layout)
    n = len(listing.items)
    order = np.random.default_rng([options.seed, 0x5EED]).permutation(n)
    per_shard = options.samples_per_shard or _estimate_samples_per_shard(listing, order, options)
    plans = [
        _ShardPlan(
            f"{options.prefix}-{s:06d}.tar",
            [int(i) for i in order[a : a + per_shard]],
            [listing.items[int(i)] for i in order[a : a + per_shard]],
        )
        for s, a in enumerate(range(0, n, per_shard))
    ]
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    settings = {"source": src, "layout": layout, "resolution": options.resolution,
                "transform": options.transform, "format": options.image_format, "quality": options.quality,
                "samples_per_shard": per_shard, "seed": options.seed, "prefix": options.prefix}  # fmt: skip
    _claim_out(fs, root, out, settings, options.overwrite)
    report = ShardsReport(manifest=None)  # type: ignore[arg-type]  # set below
    infos: dict[str, dict[str, Any]] = {}
    skipped: dict[str, list[list[str]]] = {}
    todo: list[_ShardPlan] = []
    for plan in plans:
        record = _read_record(fs, f"{root}/_progress/{plan.name}.json")
        if record is not None and record.get("plan") == plan.digest(options) and fs.exists(f"{root}/{plan.name}"):
            shard = record["shard"]
            if sha256_of(fs, f"{root}/{plan.name}") == (shard["bytes"], shard["sha256"]):
                infos[plan.name], skipped[plan.name] = shard, record["skipped"]
                report.kept.append(plan.name)
                continue
        todo.append(plan)

    from tqdm import tqdm

    with tqdm(total=n, unit="img", disable=not options.progress, desc="shards") as bar:
        bar.update(sum(len(p.indices) for p in plans if p.name in infos))

        def done(plan: _ShardPlan, info: dict[str, Any], bad: list[list[str]]) -> None:
            record = {"plan": plan.digest(options), "shard": info, "skipped": bad}
            publish_atomic(f"{root}/_progress/{plan.name}.json", json.dumps(record).encode(), fs=fs)
            infos[plan.name], skipped[plan.name] = info, bad
            report.written.append(plan.name)
            bar.update(len(plan.indices))

        if options.workers <= 1 or len(todo) <= 1:
            for plan in todo:
                done(plan, *_write_shard(out, plan, options))
        else:
            with ProcessPoolExecutor(max_workers=options.workers) as pool:
                futures = [(plan, pool.submit(_write_shard, out, plan, options)) for plan in todo]
                for plan, future in futures:
                    done(plan, *future.result())

    shards = [ShardInfo(**infos[p.name]) for p in plans]
    report.skipped = [(ref, reason) for p in plans for ref, reason in skipped[p.name]]
    report.manifest = Manifest(
        shards=shards,
        resolution=options.resolution,
        num_classes=len(listing.class_names) if listing.class_names else 0,
        has_labels=listing.has_labels,
        has_captions=listing.has_captions,
        image_format=options.image_format,
        channels=3,
        class_names=listing.class_names,
    )
    summary = {
        "source": src,
        "layout": layout,
        "samples": report.manifest.num_samples,
        "skipped": [{"source": ref, "reason": reason} for ref, reason in report.skipped],
    }
    publish_atomic(f"{root}/report.json", (json.dumps(summary, indent=1) + "\n").encode(), fs=fs)
    if layout == "classes" and listing.class_names:
        mapping = {name: i for i, name in enumerate(listing.class_names)}
        publish_atomic(f"{root}/classes.json", (json.dumps(mapping, indent=1) + "\n").encode(), fs=fs)
    write_manifest(out, report.manifest)
    for ref, reason in report.skipped[:20]:
        log.warning("skipped unreadable source %s (%s)", ref, reason)
    return report


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    record = _read_json(fs, path)
    return record if record is not None and "shard" in record and "plan" in record else None
