"""The built-in synthetic dataset: one procedurally drawn shape per image, with a class label and a caption.

Each image shows one shape (`KINDS`: circle, square, triangle, diamond, cross, ring) of one named colour on a
solid background of another named colour with a gentle linear gradient. Where the shape sits is the `layout`:
- "grid" (the default): small (about a third of the image) or large (about 55-65%), in one of 3x3 grid positions
  with a little jitter;
- "centred": always large, at the centre with the same jitter. Sample i has the same kind, colours, gradient and
  label in both layouts; only its size and place differ. One placement to learn instead of 18 makes it a simpler
  set for short CPU runs.
The label is the shape kind's index in `KINDS`; the caption says everything drawn, e.g. "a small red circle at
the top left on a blue background".

Contract:
- Sample i depends only on (seed, i, resolution, layout), never on sharding or on how many samples are written:
  it is drawn from `np.random.default_rng([seed, i])`, and the shards of equal inputs are byte-identical.
- Shapes are antialiased by coverage: the shape mask is drawn at 4x and box-filtered down, then blended,
  so pixels fully inside a shape have exactly the palette colour.
- `ensure_synthetic_dataset` is safe when several processes race to create the same cached dataset.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageDraw

from pipeline.data.shards import MANIFEST_NAME, Manifest, ShardWriter, read_manifest

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
LAYOUTS: tuple[str, ...] = ("grid", "centred")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 70),
    "blue": (45, 85, 215),
    "yellow": (245, 215, 45),
    "white": (240, 240, 240),
    "orange": (245, 140, 30),
    "purple": (145, 65, 190),
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
}
SHAPE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "orange", "purple")
BACKGROUND_COLORS: tuple[str, ...] = ("black", "gray", "blue", "green", "red", "white")
# Shape/background pairs closer than this in RGB are never drawn: a GAN at 32px should see every shape.
MIN_CONTRAST = 120.0
ROWS: tuple[str, ...] = ("top", "", "bottom")
COLS: tuple[str, ...] = ("left", "", "right")
SIZES: dict[str, tuple[float, float]] = {"small": (0.30, 0.38), "large": (0.54, 0.64)}  # bbox / image width
MARGIN = 0.04  # gap between a shape at an edge position and the image border, as a fraction of the width
JITTER = 0.025  # max random offset of the shape centre from its grid position
MAX_GRADIENT = 0.10  # background brightness varies by up to +-10% across the image
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """Everything drawn in one synthetic image; `center` and `extent` are fractions of the image size."""

    kind: str
    color: str
    background: str
    size: str  # "small" or "large"
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 middle, 2 right
    center: tuple[float, float]  # (x, y)
    extent: float  # bounding-box width of the shape
    gradient: tuple[float, float]  # background brightness factor per unit (x, y) from the centre

    @property
    def label(self) -> int:
        return KINDS.index(self.kind)

    @property
    def position(self) -> str:
        words = " ".join(w for w in (ROWS[self.row], COLS[self.col]) if w)
        return words or "center"

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.kind} at the {self.position} on a {self.background} background"


def sample_spec(seed: int, index: int, layout: str = "grid") -> ShapeSpec:
    """The attributes of sample `index` (independent of resolution, so a dataset is the same at any size)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    rng = np.random.default_rng([seed, index])
    kind = KINDS[rng.integers(len(KINDS))]
    background = BACKGROUND_COLORS[rng.integers(len(BACKGROUND_COLORS))]
    bg = np.array(PALETTE[background], dtype=np.float64)
    allowed = [c for c in SHAPE_COLORS if np.linalg.norm(np.array(PALETTE[c]) - bg) >= MIN_CONTRAST]
    color = allowed[rng.integers(len(allowed))]
    size = ("small", "large")[rng.integers(2)]
    # Every layout draws the same numbers in the same order, so the other attributes agree across layouts.
    extent = float(rng.uniform(*SIZES[size]))
    if layout == "centred":
        size, extent = "large", float(np.interp(extent, SIZES[size], SIZES["large"]))
    row, col = (int(v) for v in rng.integers(3, size=2))
    if layout == "centred":
        row, col = 1, 1
    span = 1 - 2 * MARGIN - extent  # room the centre has to move across the image
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    cx = MARGIN + extent / 2 + col * span / 2 + jitter[0]
    cy = MARGIN + extent / 2 + row * span / 2 + jitter[1]
    # Keep the whole shape inside the image even after jitter.
    cx, cy = (float(np.clip(v, extent / 2, 1 - extent / 2)) for v in (cx, cy))
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, MAX_GRADIENT)
    gradient = (float(strength * np.cos(angle)), float(strength * np.sin(angle)))
    return ShapeSpec(kind, color, background, size, row, col, (cx, cy), extent, gradient)


def _shape_mask(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """Coverage in [0, 1] of the shape per output pixel, [H, W] float32."""
    s = resolution * SUPERSAMPLE
    mask = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = spec.center[0] * s, spec.center[1] * s
    h = spec.extent * s / 2
    if spec.kind == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif spec.kind == "square":
        q = h * 0.85  # a full-bbox square looks much bigger than the circle of the same width
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    elif spec.kind == "triangle":
        t = h * np.sqrt(3) / 2  # equilateral, centred on its bounding box
        draw.polygon([(cx, cy - t), (cx + h, cy + t), (cx - h, cy + t)], fill=255)
    elif spec.kind == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=255)
    elif spec.kind == "cross":
        t = h * 0.34
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=255)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=255)
    elif spec.kind == "ring":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
        r = h * 0.5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
    else:
        raise ValueError(f"unknown shape kind {spec.kind!r}")
    # reduce() is an exact box average: coverage antialiasing that keeps fully covered pixels at 1.0.
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def render(spec: ShapeSpec, resolution: int) -> np.ndarray:
    """Draw `spec` as an [H, W, 3] uint8 image."""
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    shade = 1 + spec.gradient[0] * coords[None, :] + spec.gradient[1] * coords[:, None]
    bg = np.asarray(PALETTE[spec.background], dtype=np.float32)[None, None, :] * shade[:, :, None]
    fg = np.asarray(PALETTE[spec.color], dtype=np.float32)[None, None, :]
    alpha = _shape_mask(spec, resolution)[:, :, None]
    image = bg * (1 - alpha) + fg * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def synthetic_sample(seed: int, index: int, resolution: int, layout: str = "grid") -> tuple[np.ndarray, ShapeSpec]:
    """Sample `index` of the synthetic dataset with `seed`: ([H, W, 3] uint8 image, its attributes)."""
    spec = sample_spec(seed, index, layout)
    return render(spec, resolution), spec


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Low compression: these tiny images gain little from more, and generation speed matters for first use.
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_synthetic_dataset(
    out_url: str, n: int, resolution: int, seed: int = 0, samples_per_shard: int = 1000, layout: str = "grid"
) -> Manifest:
    """Write n synthetic samples as shards + manifest to `out_url` (any fsspec URL); returns the manifest."""
    if n <= 0:
        raise ValueError(f"n={n} must be positive")
    if resolution < 4:
        raise ValueError(f"resolution={resolution} must be at least 4")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    with ShardWriter(
        out_url,
        resolution=resolution,
        num_classes=len(KINDS),
        has_labels=True,
        has_captions=True,
        class_names=list(KINDS),
        samples_per_shard=samples_per_shard,
    ) as writer:
        for i in range(n):
            image, spec = synthetic_sample(seed, i, resolution, layout)
            writer.write(f"{i:09d}", encode_png(image), label=spec.label, caption=spec.caption)
    return writer.close()


def synthetic_dataset_url(cache_dir: str, n: int, resolution: int, seed: int, layout: str = "grid") -> str:
    suffix = "" if layout == "grid" else f"-{layout}"  # the grid layout keeps the cache folders made before layouts
    return f"{cache_dir.rstrip('/')}/synth/r{resolution}-n{n}-s{seed}{suffix}"


def _write_and_rename_into_place(path: str, n: int, resolution: int, seed: int, layout: str) -> None:
    """Write the dataset to a temporary folder and rename it to `path`, unless a complete copy got there first."""
    manifest = f"{path}/{MANIFEST_NAME}"
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_synthetic_dataset(tmp, n, resolution, seed, layout=layout)
        for _ in range(3):
            try:
                os.rename(tmp, path)  # atomic; fails if a folder is already there
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if os.path.exists(manifest):
                return  # a concurrent writer finished first: use its (identical) copy
            # A folder without a manifest was not made by this function (it only renames complete folders into
            # place): move it aside atomically and delete it. A writer may have completed it since the check
            # above; then it goes back (or stays aside, when yet another copy took its place meanwhile).
            aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, aside)
            if os.path.exists(f"{aside}/{MANIFEST_NAME}"):
                with contextlib.suppress(OSError):
                    os.rename(aside, path)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic_dataset(cache_dir: str, n: int, resolution: int, seed: int, layout: str = "grid") -> str:
    """The URL of the cached synthetic dataset for these arguments, written on first use.

    On a local disk the dataset is written to a temporary folder and renamed into place, so concurrent callers
    never see a half-written folder and the loser of a race discards its copy. On object stores (no atomic
    folder rename) it is written in place: every shard is itself written atomically, the manifest comes last
    and marks completion, and racing writers write byte-identical files.
    """
    url = synthetic_dataset_url(cache_dir, n, resolution, seed, layout)
    fs, path = fsspec.core.url_to_fs(url)
    manifest = f"{path}/{MANIFEST_NAME}"
    if fs.exists(manifest):
        return url
    if not isinstance(fs, LocalFileSystem):
        write_synthetic_dataset(url, n, resolution, seed, layout=layout)
        return url
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A racing caller may briefly move a complete folder aside (below); the next attempt then finds it back.
    for _ in range(3):
        if os.path.exists(manifest):
            break
        _write_and_rename_into_place(path, n, resolution, seed, layout)
    read_manifest(url)  # fail here, naming the URL, rather than later in the loader
    return url
