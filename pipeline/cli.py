"""The `ganpipe` command. Thin: it parses arguments and calls the library; errors become one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> None:
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg, resume=args.resume)
    print(f"run dir: {result.run_dir} ({result.kimg:.1f} kimg, last checkpoint: {result.checkpoint})")


def _cmd_config(args: argparse.Namespace) -> None:
    from pipeline.config import load_config, to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides)), end="")


def _cmd_data_synth(args: argparse.Namespace) -> None:
    from pipeline.data import write_synthetic_dataset

    manifest = write_synthetic_dataset(
        args.out, n=args.n, resolution=args.resolution, seed=args.seed, samples_per_shard=args.samples_per_shard
    )
    print(f"wrote {manifest.num_samples} images in {len(manifest.shards)} shards to {args.out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from pipeline.export import export_generator

    meta = export_generator(args.source, args.out)
    print(f"exported {meta.family} generator ({meta.resolution}px, {meta.kimg:.1f} kimg) to {args.out}")


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from pipeline.export import load_generator
    from pipeline.export.generate import generate_images, parse_seeds, write_images
    from pipeline.imaging import save_image_grid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seeds = parse_seeds(args.seeds)
    G = load_generator(args.export_dir, device=device)
    images = generate_images(G, seeds, truncation_psi=args.trunc, class_idx=args.class_idx, noise_mode=args.noise_mode)
    if args.outdir:
        write_images(images, seeds, args.outdir)
        print(f"wrote {len(seeds)} images to {args.outdir}")
    if args.out:
        save_image_grid(images, args.out)
        print(f"wrote a grid of {len(seeds)} images to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ganpipe", description="Train, export and sample GANs at scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a recipe (key=value overrides allowed)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/stylegan2/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=64")
    p.add_argument(
        "--resume",
        metavar="auto|CKPT",
        help="'auto': continue from the newest valid checkpoint in run_dir (or start fresh); or a checkpoint path",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config of a recipe with overrides")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = data_sub.add_parser("synth", help="write the built-in synthetic shapes dataset as shards")
    s.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    s.add_argument("--n", type=int, default=2000, help="number of images")
    s.add_argument("--resolution", type=int, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.set_defaults(func=_cmd_data_synth)

    p = sub.add_parser("export", help="export G_ema of a checkpoint or run dir as safetensors + JSON")
    p.add_argument("source", help="checkpoint file or run dir (its newest valid checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("generate", help="sample images from an exported generator")
    p.add_argument("export_dir", help="folder written by `ganpipe export`")
    p.add_argument("--seeds", default="0-15", help="e.g. 0-15 or 1,5,9-12")
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi (1 = none)")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="class index for conditional models")
    p.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    p.add_argument("--out", help="write one grid PNG here")
    p.add_argument("--outdir", help="write one PNG per seed into this folder")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and not (args.out or args.outdir):
        parser.error("generate needs --out GRID.png and/or --outdir DIR")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from pipeline.errors import GanpipeError

    try:
        args.func(args)
    except GanpipeError as e:
        print(f"ganpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ganpipe: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
