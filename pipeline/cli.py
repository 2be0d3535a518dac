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
    print(f"run dir: {result.run_dir} ({result.kimg:.3f} kimg, last checkpoint: {result.checkpoint})")


def _cmd_config(args: argparse.Namespace) -> None:
    from pipeline.config import load_config, to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides)), end="")


def _cmd_data_synth(args: argparse.Namespace) -> None:
    from pipeline.data import write_synthetic_dataset

    manifest = write_synthetic_dataset(
        args.out, n=args.n, resolution=args.resolution, seed=args.seed, samples_per_shard=args.samples_per_shard
    )
    print(f"wrote {manifest.num_samples} images in {len(manifest.shards)} shards to {args.out}")


def _cmd_data_shards(args: argparse.Namespace) -> None:
    from pipeline.data.ingest import ShardsOptions, write_shards

    options = ShardsOptions(
        resolution=args.resolution,
        transform=args.transform,
        image_format=args.format,
        quality=args.quality,
        shard_size=args.shard_size_mb << 20,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = write_shards(args.src, args.out, args.layout, options)
    m = report.manifest
    print(
        f"wrote {m.num_samples} images in {len(m.shards)} shards to {args.out} "
        f"({len(report.written)} written, {len(report.kept)} already complete, {len(report.skipped)} unreadable "
        "sources skipped: see report.json)"
    )


def _cmd_data_inspect(args: argparse.Namespace) -> None:
    import json

    from pipeline.data.inspect import inspect_dataset

    print(json.dumps(inspect_dataset(args.url, num_workers=args.workers), indent=1))


def _cmd_bench_data(args: argparse.Namespace) -> None:
    from pipeline.data.bench import main as bench_data

    bench_data(args=args)


def _eval_changes(args: argparse.Namespace) -> dict:
    return {
        "extractor": args.extractor,
        "inception_weights": args.inception_weights,
        "resize": args.resize,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "seed": args.seed,
        "cache_url": args.cache,
    }


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from pipeline.errors import ConfigError
    from pipeline.metrics.run import build_stats, evaluate_source

    metrics = args.metrics.split(",") if args.metrics else None
    if args.target == "stats":
        if not args.data_url:
            raise ConfigError("ganpipe eval stats needs the dataset: ganpipe eval stats DATA_URL (a shard folder)")
        done = build_stats(args.data_url, metrics=metrics or ["fid50k_full"], changes=_eval_changes(args),
                           device=args.device, progress=not args.no_progress)  # fmt: skip
        for entry in done:
            print(json.dumps(entry))
        return
    record = evaluate_source(args.target, metrics=metrics, data_url=args.data, changes=_eval_changes(args),
                             device=args.device, jsonl=args.jsonl, progress=not args.no_progress)  # fmt: skip
    print(json.dumps(record, indent=1))


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
    s = data_sub.add_parser("shards", help="write images (folder, classes, captions, nvlabs-zip) as WebDataset shards")
    s.add_argument("src", help="source folder, caption table (.csv/.tsv/.parquet) or dataset_tool zip (any fsspec URL)")
    s.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    s.add_argument("--layout", choices=["folder", "classes", "captions", "nvlabs-zip"], default="folder")
    s.add_argument("--resolution", type=int, required=True, help="output images are RESOLUTION x RESOLUTION")
    s.add_argument("--transform", choices=["center-crop", "resize"], default="center-crop")
    s.add_argument("--format", choices=["jpg", "png", "webp"], default="jpg")
    s.add_argument("--quality", type=int, default=90, help="jpg/webp quality (default 90)")
    s.add_argument("--shard-size-mb", type=int, default=256, help="target shard size (default 256 MiB)")
    s.add_argument("--samples-per-shard", type=int, default=None, help="fixed count instead of --shard-size-mb")
    s.add_argument("--workers", type=int, default=1, help="encoding processes")
    s.add_argument("--seed", type=int, default=0, help="seed of the shuffle into shards")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_data_shards)
    s = data_sub.add_parser("inspect", help="read every sample once and print a JSON summary")
    s.add_argument("url", help="dataset folder, manifest.json, or shard URLs with {000000..000123} braces")
    s.add_argument("--workers", type=int, default=0, help="reader processes")
    s.set_defaults(func=_cmd_data_inspect)

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    s = bench_sub.add_parser("data", help="streaming loader vs bare tar-read + decode loop (img/s, ratio)")
    s.add_argument("--n", type=int, default=4000, help="images to write and read")
    s.add_argument("--resolution", type=int, default=256)
    s.add_argument("--quality", type=int, default=90, help="JPEG quality")
    s.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best counts")
    s.set_defaults(func=_cmd_bench_data)

    p = sub.add_parser(
        "eval",
        help="metrics of a run dir / checkpoint / export (FID, KID, IS, PR); 'eval stats DATA_URL' caches the reals",
    )
    p.add_argument("target", help="run dir, checkpoint or export folder; or 'stats' to build reference statistics")
    p.add_argument("data_url", nargs="?", help="with 'stats': the dataset (shard folder, any fsspec URL)")
    p.add_argument("--metrics", help="comma-separated, e.g. fid50k_full,kid50k_full (default: the run's eval.metrics)")
    p.add_argument("--data", help="real images to compare with (default: the data the run trained on)")
    p.add_argument("--extractor", choices=["inception", "small"], help="default inception")
    p.add_argument("--inception-weights", help="path or URL of the FID Inception-v3 weights (copied into the cache)")
    p.add_argument("--resize", choices=["clean", "legacy"], help="clean (PIL bicubic, default) or legacy (TF1)")
    p.add_argument("--batch-size", type=int, help="images per batch per rank (default 64)")
    p.add_argument("--workers", type=int, help="data-loading processes per rank")
    p.add_argument("--seed", type=int, help="latent seed of the generated images (default 0)")
    p.add_argument("--cache", help="reference statistics cache URL (default <cache>/metrics)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--jsonl", help="also append the result as one JSON line to this file (e.g. RUN_DIR/metrics.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

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
