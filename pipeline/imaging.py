"""Generated images to 8 bits and to PNG files on any fsspec URL (sample grids, `ganpipe generate`, metrics).

`to_uint8` is the one conversion from generator output to pixels: x in [-1, 1] -> clamp(x * 127.5 + 128, 0, 255),
truncated, as NVIDIA's generate.py and metric code do, so ganpipe's PNGs and its FID inputs are NVIDIA's pixels.
"""

from __future__ import annotations

import math

import fsspec
import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] float in [-1, 1] -> uint8 [N, C, H, W] on the same device."""
    return (images.detach() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] float in [-1, 1] -> [N, H, W, C] uint8 numpy (for PNGs)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the most square grid that holds n images, wider than tall."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def make_grid(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*H, cols*W, C] image; empty cells stay black."""
    n, h, w, c = images.shape
    if n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows}x{cols} grid")
    canvas = np.zeros([rows * cols, h, w, c], dtype=np.uint8)
    canvas[:n] = images
    return canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(image: np.ndarray, url: str) -> None:
    """Write an [H, W, C] uint8 array as PNG to `url` (any fsspec URL; parent folders are created)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    pil = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode)
    with fs.open(path, "wb") as fh:
        pil.save(fh, format="PNG")


def save_image_grid(images: torch.Tensor, url: str, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Float images in [-1, 1] -> one PNG grid at `url` (rows x cols, default near-square); returns the grid
    ([H, W, C] uint8)."""
    rows, cols = grid if grid is not None else grid_shape(images.shape[0])
    canvas = make_grid(to_hwc(images), rows, cols)
    save_png(canvas, url)
    return canvas


__all__ = ["grid_shape", "make_grid", "save_image_grid", "save_png", "to_hwc", "to_uint8"]
