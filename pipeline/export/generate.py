"""What `ganpipe generate` needs around a family's sampler: seed lists from the command line, and images or
frames written as PNGs. The images themselves come from the sampler (`pipeline.models.sampling`,
`pipeline.models.stylegan_sampling`), loaded with `pipeline.export.load_sampler`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor

from pipeline.errors import SamplingError
from pipeline.imaging import save_png, to_hwc

MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32)


def parse_int_list(text: str, flag: str) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (inclusive ranges); errors name `flag`."""
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise SamplingError(f"{flag} {text!r} is invalid at {part!r}: use a list like 0-15 or 1,5,9-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise SamplingError(f"{flag} range {part!r} is descending: write it as {hi}-{lo}")
        values.extend(range(lo, hi + 1))
    return values


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (inclusive ranges), each a valid seed in [0, 2**32)."""
    seeds = parse_int_list(text, flag)
    too_big = [s for s in seeds if s > MAX_SEED]
    if too_big:
        raise SamplingError(f"{flag} {too_big[0]} is out of range: seeds are 0..{MAX_SEED}")
    return seeds


def write_images(images: Tensor, seeds: list[int], out_dir: str) -> list[str]:
    """One PNG per seed, `seedNNNN.png`."""
    urls = []
    for image, seed in zip(to_hwc(images), seeds, strict=True):
        url = f"{out_dir.rstrip('/')}/seed{seed:04d}.png"
        save_png(image, url)
        urls.append(url)
    return urls


def write_frames(batches: Iterable[Tensor], out_dir: str) -> list[str]:
    """Frames as `frame000000.png`, `frame000001.png`, ... (ffmpeg -i frame%06d.png makes a video of them)."""
    urls: list[str] = []
    for batch in batches:
        for image in to_hwc(batch):
            url = f"{out_dir.rstrip('/')}/frame{len(urls):06d}.png"
            save_png(image, url)
            urls.append(url)
    return urls


__all__ = ["MAX_SEED", "parse_int_list", "parse_seeds", "write_frames", "write_images"]
