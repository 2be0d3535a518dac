"""Benchmark exported generators: parity of ONNX (onnxruntime) with PyTorch, and images/s of both, side by side.

    python tools/bench_export.py [--recipes tiny,ffhq256] [--batch 8] [--repeats 3] [--threads N]

For each recipe's StyleGAN2 generator (random weights with w_avg moved off zero, so truncation matters; same graph
and cost as a trained one) it writes an export folder with `--format onnx` (which verifies itself) and then
measures, on this machine's CPU:
    parity   max |onnxruntime - PyTorch| over seeds at batch 1 and at `--batch`, truncation 0.7 and 1, both run
             here (PyTorch: the family's sampler, float32, the ops' reference implementation on the CPU)
    speed    images/s of PyTorch eager and of onnxruntime at `--batch`, interleaved `--repeats` times; the ratio
             is of the medians measured in this run
Prints a Markdown table and exits 0 (1 if a parity is over 1e-4, the target).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a clone without installing
from pipeline.config import load_config
from pipeline.export import export_generator, load_sampler
from pipeline.export.format import ExportedGenerator, write_export
from pipeline.export.runtime import open_graph_sampler
from pipeline.families import get_family
from pipeline.models.conditioning import Request
from pipeline.models.stylegan_sampling import StyleGANOptions

REPO = Path(__file__).resolve().parents[1]
TARGET = 1e-4


def make_export(recipe: str, folder: str) -> tuple[int, int]:
    """An export folder of the recipe's generator (random weights); (resolution, parameters)."""
    cfg = load_config(str(REPO / "recipes" / "stylegan2" / f"{recipe}.yaml"))
    family = get_family(cfg.family)
    model = cfg.to_dict()["model"]
    torch.manual_seed(0)
    G = family.build_generator(family.spec(cfg.model, cfg.data.resolution))
    with torch.no_grad():
        G.mapping.w_avg.normal_(0, 1)
    write_export(folder, ExportedGenerator(cfg.family, model, cfg.data.resolution), {"G_ema": G.state_dict()})
    return cfg.data.resolution, sum(p.numel() for p in G.parameters())


def images_per_second(sampler, seeds: list[int]) -> float:
    t0 = time.perf_counter()
    sampler.generate(seeds, batch_size=len(seeds))
    return len(seeds) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="tiny,ffhq256", help="recipes/stylegan2/NAME.yaml, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads; torch {torch.__version__}; batch {args.batch}; medians of {args.repeats}\n")
    print(f"| generator | params | export s | max diff, batch 1 | max diff, batch {args.batch} | PyTorch img/s "
          "| onnxruntime img/s | onnxruntime / PyTorch |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for recipe in args.recipes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            resolution, params = make_export(recipe, folder)
            t0 = time.perf_counter()
            export_generator(folder, folder, ["onnx"])
            export_s = time.perf_counter() - t0
            eager, onnx = load_sampler(folder), open_graph_sampler(folder)
            diffs = {}
            for n, seeds in ((1, [11]), (args.batch, list(range(100, 100 + args.batch)))):
                diffs[n] = max(
                    float(np.abs(onnx.generate(seeds, Request(), opts).numpy()
                                 - eager.generate(seeds, Request(), opts).numpy()).max())
                    for opts in (StyleGANOptions(truncation_psi=0.7, truncation_center="global"), StyleGANOptions())
                )  # fmt: skip
            worst = max(worst, *diffs.values())
            speed: dict[str, list[float]] = {"torch": [], "onnx": []}
            seeds = list(range(args.batch))
            for sampler in (eager, onnx):  # warm-up: allocator, onnxruntime's first-run planning
                sampler.generate(seeds, batch_size=args.batch)
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                for name, sampler in (("torch", eager), ("onnx", onnx)):
                    speed[name].append(images_per_second(sampler, seeds))
            t, o = statistics.median(speed["torch"]), statistics.median(speed["onnx"])
            print(f"| StyleGAN2 {recipe} ({resolution}px) | {params / 1e6:.1f}M | {export_s:.0f} | {diffs[1]:.1e} | "
                  f"{diffs[args.batch]:.1e} | {t:.2f} | {o:.2f} | {o / t:.2f}x |", flush=True)  # fmt: skip
    if worst >= TARGET:
        print(f"\nparity target missed: max diff {worst:.2e} >= {TARGET:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
