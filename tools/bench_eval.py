"""Benchmark feature extraction: images/s of each extractor and resize policy on the current device.

    python tools/bench_eval.py [--device cuda] [--n 256] [--batch-size 64] [--resolution 256] [--weights PATH]

Without --weights the Inception-v3 is randomly initialised (same architecture, same cost). Prints a Markdown
table; a warm-up batch is excluded from the timing. Generation cost is not included (it is the model's own).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from pipeline.metrics import (
    EvalConfig,
    InceptionV3,
    SmallExtractor,
    build_extractor,
    random_inception_state_dict,
)


def bench(extractor: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> float:
    extractor(images[:batch_size].to(device))  # warm-up: allocator, cuDNN autotuning, lazy init
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(images), batch_size), leave=False, unit="batch"):
        extractor(images[i : i + batch_size].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=256, help="images per measurement")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--weights", help="Inception weights (path or URL); default: random weights, same cost")
    args = p.parse_args()
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.n, 3, args.resolution, args.resolution), dtype=torch.uint8)
    if args.weights:
        make = lambda resize: build_extractor(EvalConfig(inception_weights=args.weights, resize=resize), ".", device)  # noqa: E731
    else:
        state = random_inception_state_dict()
        make = lambda resize: InceptionV3(state, resize).to(device)  # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.n} images of {args.resolution}px, batch {args.batch_size}\n")
    print("| extractor | resize | img/s |")
    print("| --- | --- | ---: |")
    for label, ext, resize in (
        ("inception-v3 (2048-d)", make("legacy"), "legacy (TF1 bilinear, on device)"),
        ("inception-v3 (2048-d)", make("clean"), "clean (antialiased bicubic, on device)"),
        ("small (256-d)", SmallExtractor().to(device), "bilinear antialias to 64px"),
    ):
        print(f"| {label} | {resize} | {bench(ext, images, args.batch_size, device):.1f} |", flush=True)


if __name__ == "__main__":
    main()
