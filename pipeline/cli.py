"""The `ganpipe` command. Thin: it parses arguments and calls the library; errors become one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(args.recipe, args.overrides)
    result = train(cfg, resume=args.resume)
    print(f"run dir: {result.run_dir} ({result.kimg:.3f} kimg, last checkpoint: {result.checkpoint})")
    if result.stopped_by is not None and result.preempted:
        then = "the Slurm job requeued itself" if result.requeued else "continue with --resume auto"
        print(f"stopped early by {result.stopped_by} at {result.kimg:.3f} kimg: {then}", file=sys.stderr)
    elif result.stopped_by is not None:
        print(f"{result.stopped_by} cut the final evaluation short: training is complete; evaluate it with "
              f"`ganpipe eval {result.run_dir}`", file=sys.stderr)  # fmt: skip
    return result.exit_code


def _cmd_submit(args: argparse.Namespace) -> None:
    from pipeline.launch import SubmitRequest, submit
    from pipeline.launch.slurm import watch_hint

    request = SubmitRequest(
        recipe=args.recipe,
        profile=args.profile,
        overrides=args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        job_name=args.job_name,
    )
    sub = submit(request, dry_run=args.dry_run)
    if args.dry_run:
        print(sub.script, end="")
        print(f"dry run: not submitted; the script trains from {sub.frozen_config}, written now", file=sys.stderr)
        return
    hint = watch_hint(sub)
    print(f"submitted job {sub.job_id}: run dir {sub.run_dir}")
    print(f"  log: {hint['log']}  (watch: tail -f; queue: {hint['squeue']})")


def _cmd_config(args: argparse.Namespace) -> None:
    from pipeline.config import load_config, to_yaml

    print(to_yaml(load_config(args.recipe, args.overrides)), end="")


def _cmd_data_synth(args: argparse.Namespace) -> None:
    from pipeline.data import write_synthetic_dataset

    manifest = write_synthetic_dataset(
        args.out,
        n=args.n,
        resolution=args.resolution,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        layout=args.layout,
    )
    print(f"wrote {manifest.num_samples} images in {len(manifest.shards)} shards to {args.out}")


def _cmd_data_shards(args: argparse.Namespace) -> None:
    from pipeline.data.ingest import ShardsOptions, write_shards
    from pipeline.storage import user_url

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
        overwrite=args.overwrite,
    )
    with user_url("the source or --out", f"{args.src} -> {args.out}"):
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
    from pipeline.storage import user_url

    with user_url("dataset", args.url):
        summary = inspect_dataset(args.url, num_workers=args.workers)
    print(json.dumps(summary, indent=1))


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from pipeline.data.bench import bench_shards, format_soak, format_table, run_bench, soak
    from pipeline.errors import ConfigError

    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--workers {args.workers!r} must be comma-separated integers, e.g. 1,2") from None
    if not workers or min(workers) < 1:
        raise ConfigError(f"--workers {args.workers!r} must list worker counts >= 1, e.g. 1,2")
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--repeats", args.repeats)):
        if value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if args.read is not None and args.read < args.batch_size:
        raise ConfigError(f"--read {args.read} must be at least --batch-size ({args.batch_size})")
    with bench_shards(args.n, args.resolution, args.quality) as url:
        if args.soak > 0:
            samples = soak(url, max(workers), args.soak, args.batch_size, args.resolution)
            print(format_soak(samples, args.resolution))
        else:
            read = args.read or 3 * args.n
            rows = run_bench(url, read, args.resolution, workers, args.batch_size, args.repeats)
            print(format_table(rows, args.resolution, args.quality, args.n, read))
    return 0


def _cmd_bench_ops(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.models.bench import synthesis_case
    from pipeline.ops.aot import parse_targets
    from pipeline.ops.bench import parse_dtypes, run

    try:
        dtypes = parse_dtypes(args.dtypes)
        targets = None if args.targets is None else parse_targets(args.targets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return run(
        quick=args.quick, dtypes=dtypes, warmup=args.warmup, rep=args.rep, synthesis=synthesis_case, targets=targets
    )


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from pipeline.train.bench import format_report, run_bench_train

    result = run_bench_train(
        args.recipe,
        args.overrides,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        device=args.device,
        callbacks=args.callbacks,
        compare=args.compare,
    )
    print(format_report(result))
    return 0


def _eval_changes(args: argparse.Namespace) -> dict:
    from pipeline.metrics.config import parse_classes

    return {
        "extractor": args.extractor,
        "inception_weights": args.inception_weights,
        "resize": args.resize,
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "seed": args.seed,
        "cache_url": args.cache,
        "classes": parse_classes(args.classes, "--classes") if args.classes is not None else None,
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
    from pipeline.export.derive import parse_formats

    formats = parse_formats(args.format)
    meta = export_generator(args.source, args.out, formats, uint8=args.uint8, tolerance=args.tolerance)
    print(f"exported {meta.family} generator ({meta.resolution}px, {meta.kimg:.1f} kimg) to {args.out}")
    for fmt in formats:
        if fmt in meta.formats:
            record = meta.formats[fmt]
            files = ", ".join(name for graph in record["graphs"].values() for name in graph["files"])
            checked = record["verified"]
            unit = " levels" if checked["unit"] == "levels" else ""
            print(f"  {fmt}: {files} (max |diff| to PyTorch {checked['max_abs_diff']:.2g}{unit}, batch sizes "
                  f"{' and '.join(map(str, checked['batch_sizes']))} from one file)")  # fmt: skip


def _cmd_convert(args: argparse.Namespace) -> None:
    from pipeline.export import convert

    meta, notes = convert(args.convert_command, args.source, args.out, with_discriminator=args.discriminator)
    for note in notes:
        print(f"note: {note}")
    print(f"converted {meta.resolution}px {meta.family} networks ({', '.join(meta.networks)}) to {args.out}")


def _cmd_generate(args: argparse.Namespace) -> None:
    """Runs with `args.sampler`: the source's family sampler, loaded before the options were parsed."""
    import torch

    from pipeline.errors import SamplingError
    from pipeline.export import generate as gen
    from pipeline.imaging import save_image_grid
    from pipeline.models.conditioning import Request

    if getattr(args, "motion", None) is not None:
        other = next((flag for flag, given in (("--style-mix", getattr(args, "style_mix", None)),
                      ("--interpolate", args.interpolate), ("--out", args.out)) if given), None)  # fmt: skip
        if other is not None:
            raise SamplingError(f"--motion writes one PNG per frame into --outdir: drop {other}")
    if getattr(args, "style_mix", None) and not args.out:
        raise SamplingError("--style-mix writes one grid: add --out GRID.png")
    if args.interpolate and not args.outdir:
        raise SamplingError("--interpolate writes one PNG per frame: add --outdir DIR")
    if not (getattr(args, "style_mix", None) or args.interpolate or args.out or args.outdir):
        raise SamplingError("generate needs --out GRID.png and/or --outdir DIR")
    sampler = args.sampler
    request = Request(class_idx=getattr(args, "class_idx", None), prompt=getattr(args, "prompt", None))
    asked = {name: getattr(args, name) for name in sampler.offered_options() if getattr(args, name) is not None}
    options = sampler.Options(**asked)
    if getattr(args, "style_mix", None):
        rows, cols = (gen.parse_seeds(text, "--style-mix") for text in args.style_mix)
        layers = gen.parse_int_list(args.style_layers, "--style-layers")
        images, grid = sampler.style_mix_grid(rows, cols, layers, request, options)
        save_image_grid(images, args.out, grid=grid)
        print(
            f"wrote a {len(rows)}x{len(cols)} style-mixing grid (styles {args.style_layers} from columns) to {args.out}"
        )
        return
    if args.interpolate:
        seeds = gen.parse_seeds(args.interpolate, "--interpolate")
        space = args.interp_space or sampler.interpolation_spaces[0]
        frames = sampler.interpolation_frames(seeds, args.frames, space, request, options)
        urls = gen.write_frames(frames, args.outdir)
        print(f"wrote {len(urls)} interpolation frames ({space}) to {args.outdir}")
        return
    if getattr(args, "motion", None) is not None:
        if not args.outdir:
            raise SamplingError("--motion writes one PNG per frame: add --outdir DIR")
        seeds = gen.parse_seeds(args.seeds if args.seeds is not None else "0")
        if len(seeds) != 1:
            raise SamplingError(f"--motion moves one image: give one seed, e.g. --seeds {seeds[0]}")
        urls = gen.write_frames(sampler.motion_frames(seeds[0], args.motion, request, options), args.outdir)
        print(f"wrote {len(urls)} frames of seed {seeds[0]} moving to {args.outdir}")
        return
    if getattr(args, "classes", None) is not None:
        if request.class_idx is not None:
            raise SamplingError("--classes draws one row per class: drop --class")
        if not args.out or args.outdir:
            raise SamplingError("--classes writes one grid (a row per class, the same seeds in every row): use --out")
        classes = gen.parse_int_list(args.classes, "--classes")
        per_class = 8 if args.per_class is None else args.per_class
        if per_class < 1:
            raise SamplingError(f"--per-class {per_class} is invalid: give at least 1 seed per class")
        seeds = gen.parse_seeds(args.seeds)[:per_class] if args.seeds is not None else list(range(per_class))
        rows = [sampler.generate(seeds, Request(class_idx=c, prompt=request.prompt), options) for c in classes]
        save_image_grid(torch.cat(rows), args.out, grid=(len(classes), len(seeds)))
        print(f"wrote a grid of {len(classes)} classes x {len(seeds)} seeds to {args.out}")
        return
    if getattr(args, "per_class", None) is not None:
        raise SamplingError("--per-class sets the seeds per row of a --classes grid: add --classes, e.g. 0-9")
    seeds = gen.parse_seeds(args.seeds if args.seeds is not None else "0-15")
    images = sampler.generate(seeds, request, options)
    if args.outdir:
        gen.write_images(images, seeds, args.outdir)
        print(f"wrote {len(seeds)} images to {args.outdir}")
    if args.out:
        save_image_grid(images, args.out)
        print(f"wrote a grid of {len(seeds)} images to {args.out}")


class _OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one `ganpipe: error:` line (via SamplingError), naming a flag that the
    loaded generator's family does not have instead of argparse's usage text."""

    unavailable: dict[str, str]  # flag -> why it is refused

    def error(self, message: str) -> NoReturn:
        from pipeline.errors import SamplingError

        for flag, why in getattr(self, "unavailable", {}).items():
            if re.search(rf"(^|\s){re.escape(flag)}(\s|$)", message.split(":", 1)[-1]):
                raise SamplingError(why)
        raise SamplingError(message)


RUNTIMES = ("torch", "onnxruntime")


def generate_parser(sampler: Any = None, conditioning: Any = None, family: str = "",
                    runtime: str = "torch") -> argparse.ArgumentParser:  # fmt: skip
    """`ganpipe generate`'s arguments. With a loaded source's sampler (a `Sampler`, or a `GraphSampler` for
    `--runtime onnxruntime`) and its conditioning: exactly the options that sampler offers and the request its
    conditioning takes; without, every option any registered family has (the generic help)."""
    from pipeline.families import family_names, get_family
    from pipeline.models.sampling import option_docs

    everyone = [get_family(name).sampler for name in family_names()]
    samplers = [sampler] if sampler is not None else everyone
    what = f"a {family} generator" if family else "a generator"  # in the description
    p = _OneLineErrors(prog="ganpipe generate", description=f"Sample {what}.", allow_abbrev=False)
    p.add_argument("source", help="export folder (`ganpipe export`/`convert`), checkpoint, run dir or .pkl")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="torch (default), or onnxruntime: run the export folder's ONNX graph",
    )
    p.add_argument("--seeds", help="e.g. 0-15 or 1,5,9-12 (default 0-15)")
    flags = ("--class", "--prompt") if conditioning is None else conditioning.request_flags
    if "--class" in flags:
        p.add_argument("--class", dest="class_idx", type=int, metavar="C", help="the class of a conditional generator")
        p.add_argument(
            "--classes", metavar="LIST", help="a class grid, e.g. 0-9: one row per class, the same seeds in each row"
        )
        p.add_argument(
            "--per-class", type=int, metavar="N", help="with --classes: seeds per row (default 8: seeds 0-7)"
        )
    if "--prompt" in flags:
        p.add_argument("--prompt", metavar="TEXT", help="the text of a text-conditional generator")
    docs = {name: doc for s in samplers for name, doc in s.offered_options().items()}
    defaults = {name: f.default for s in samplers for name, f in s.Options.__dataclass_fields__.items()}
    by_flag: dict[str, list[str]] = {}  # the generic help: families may share a flag (--trunc) with their own meaning
    for name, doc in docs.items():
        by_flag.setdefault(doc.flag, []).append(name)
    for flag, names in by_flag.items():
        doc = docs[names[0]]
        helps = list(dict.fromkeys(docs[name].help for name in names))
        help_text = " | ".join(helps)
        kind = doc.type or type(defaults[names[0]])
        p.add_argument(flag, dest=names[0], type=kind, choices=doc.choices, metavar=doc.metavar, help=help_text)
    if any(s.can_style_mix for s in samplers):
        p.add_argument(
            "--style-mix",
            nargs=2,
            metavar=("ROWS", "COLS"),
            help="style-mixing grid of row seeds x column seeds, e.g. --style-mix 85,100,75 55,821 (needs --out)",
        )
        p.add_argument(
            "--style-layers", default="0-6", help="with --style-mix: the styles (w indices) taken from the column seed"
        )
    if any(s.can_move for s in samplers):
        p.add_argument(
            "--motion",
            type=int,
            metavar="N",
            help="StyleGAN3: N frames of one seed moving from no move to --translate/--rotate (needs --outdir)",
        )
    p.add_argument(
        "--interpolate", metavar="SEEDS", help="frames from seed to seed, e.g. 0,5,9 (one PNG per frame in --outdir)"
    )
    p.add_argument("--frames", type=int, default=30, help="with --interpolate: frames per transition")
    spaces = list(dict.fromkeys(space for s in samplers for space in s.interpolation_spaces))
    p.add_argument(
        "--interp-space",
        choices=spaces,
        help=f"with --interpolate: {' or '.join(spaces)} (default {spaces[0]}; "
        + ", ".join({"w": "w: linear in W", "z": "z: slerp in Z"}.get(space, space) for space in spaces)
        + ")",
    )
    p.add_argument("--out", help="write one grid PNG here")
    p.add_argument("--outdir", help="write one PNG per seed (or per frame) into this folder")
    if runtime == "torch":
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    if sampler is not None:
        request_flags = {"--class", "--classes", "--per-class", "--prompt"}
        theirs = {doc.flag for cls in everyone for doc in option_docs(cls.Options).values()} | request_flags
        theirs |= {"--style-mix", "--style-layers", "--motion", "--device"}
        ours = {a for action in p._actions for a in action.option_strings}
        kind = {"none": "unconditional", "class": "class-conditional", "text": "text-conditional"}
        this = f"this {family} generator is {kind.get(conditioning.kind, conditioning.kind)}"
        families = {doc.flag for doc in option_docs(sampler.Options).values()} | {"--device"}
        if get_family(family).sampler.can_style_mix:
            families |= {"--style-mix", "--style-layers"}
        if get_family(family).sampler.can_move:
            families |= {"--motion"}
        p.unavailable = {}
        for flag in sorted(theirs - ours):
            if flag in request_flags:
                p.unavailable[flag] = f"{flag} is not available: {this}"
            elif flag == "--device":
                p.unavailable[flag] = f"--device is not available with --runtime {runtime}: it runs on the CPU here"
            elif flag in families:  # the family has it, the exported graph does not
                p.unavailable[flag] = f"{flag} is not available with --runtime {runtime}: the exported graph fixes it"
            else:
                p.unavailable[flag] = f"{flag} is not available for {family} generators: drop it"
    return p


def _run_generate(argv: list[str]) -> None:
    """`ganpipe generate SOURCE ...`: load the source's sampler first, then parse the options its family has."""
    import torch

    from pipeline.export import load_sampler
    from pipeline.export.runtime import open_graph_sampler
    from pipeline.storage import user_url

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("source", nargs="?")
    pre.add_argument("--device")
    pre.add_argument("--runtime", default="torch")
    known, _ = pre.parse_known_args(argv)
    if known.source is None or known.runtime not in RUNTIMES:
        generate_parser().parse_args(argv)  # the generic help, or its one-line error
        return
    keep: list[Any] = []  # temporary copies of a remote export's graphs live as long as this command
    if known.runtime == "onnxruntime":
        with user_url("source", known.source):
            sampler = open_graph_sampler(known.source, "onnx", keep)
    else:
        device = known.device or ("cuda" if torch.cuda.is_available() else "cpu")
        sampler = load_sampler(known.source, device=device)
    parser = generate_parser(sampler, sampler.conditioning, sampler.family, known.runtime)
    args = parser.parse_args(argv)
    args.sampler = sampler
    _cmd_generate(args)


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

    p = sub.add_parser("submit", help="submit a recipe as a Slurm job (requeues itself, resumes exactly)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/stylegan2/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run_dir=/shared/runs/x")
    p.add_argument("--profile", required=True, help="cluster profile: slurm/profiles/NAME.yaml or a YAML path")
    p.add_argument("--nodes", type=int, help="number of nodes (default: the profile's)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs (= tasks) per node (default: the profile's)")
    p.add_argument("--time", help="wall-clock limit per job, e.g. 24:00:00 (default: the profile's)")
    p.add_argument("--job-name", help="Slurm job name (default: the run dir's name)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script instead of submitting it (its frozen config is written)",
    )
    p.set_defaults(func=_cmd_submit)

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
    s.add_argument("--layout", choices=["grid", "centred"], default="grid",  # pipeline.data.synth.LAYOUTS
                   help="grid: small or large shapes at 3x3 places; centred: large shapes at the centre")  # fmt: skip
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
    s.add_argument(
        "--overwrite", action="store_true", help="replace a dataset of other settings (or other files) in --out"
    )
    s.set_defaults(func=_cmd_data_shards)
    s = data_sub.add_parser("inspect", help="read every sample once and print a JSON summary")
    s.add_argument("url", help="dataset folder, manifest.json, or shard URLs with {000000..000123} braces")
    s.add_argument("--workers", type=int, default=0, help="reader processes")
    s.set_defaults(func=_cmd_data_inspect)

    p = sub.add_parser("bench", help="benchmarks")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH_COMMAND")
    s = bench_sub.add_parser("data", help="streaming loader vs bare tar-read + decode loop (img/s, ratio)")
    s.add_argument("--n", type=int, default=4000, help="JPEG images to write (default 4000)")
    s.add_argument("--read", type=int, default=None, help="images each measurement streams (default 3 x --n)")
    s.add_argument("--resolution", type=int, default=256)
    s.add_argument("--quality", type=int, default=90, help="JPEG quality")
    s.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3, help="passes per measurement; the best counts")
    s.add_argument(
        "--soak", type=float, default=0, metavar="SECONDS", help="instead: stream this long, table of worker memory"
    )
    s.set_defaults(func=_cmd_bench_data)
    s = bench_sub.add_parser(
        "ops", help="ref vs Triton per op on StyleGAN2 shapes (ms, GB/s, speed-up); no CUDA: correctness only"
    )
    s.add_argument("--quick", action="store_true", help="two resolutions (16, 128) instead of 8..256 and 1024")
    s.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (default fp32,bf16)")
    s.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms")
    s.add_argument("--rep", type=int, default=100, help="measurement time per timing, ms")
    s.add_argument(
        "--targets",
        help="also compile every kernel variant for these GPU targets, e.g. sm_80,sm_90 (no GPU needed): shared "
        "memory, registers, spills (default: this GPU's, if sm_80/sm_90)",
    )
    s.set_defaults(func=_cmd_bench_ops)
    s = bench_sub.add_parser(
        "train",
        help="whole training steps of a recipe through the engine vs a bare loop (img/s, s/kimg, memory, "
        "time per phase, engine overhead)",
    )
    s.add_argument("recipe", help="recipe YAML, e.g. recipes/biggan/imagenet128.yaml")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=8")
    s.add_argument(
        "--steps", type=int, default=None, help="timed steps per side and repeat (default: a multiple of every "
        "phase's interval, at least 8)",
    )  # fmt: skip
    s.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per side first (default 2; raised until every phase ran once)",
    )
    s.add_argument("--repeats", type=int, default=3, help="alternating engine/bare repeats (default 3)")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    s.add_argument(
        "--callbacks", action="store_true", help="also run the checkpoint and sample-grid callbacks (temporary run dir)"
    )
    s.add_argument(
        "--compare",
        metavar="NAME=PATH",
        help="also time the reference codebase's own step from a checkout at PATH, alternating, with the ratios: "
        "nvlabs=PATH (NVlabs/stylegan2-ada-pytorch, StyleGAN2 recipes) or biggan-pytorch=PATH (ajbrock/BigGAN-PyTorch, "
        "BigGAN recipes); its code is imported from PATH at run time",
    )
    s.set_defaults(func=_cmd_bench_train)

    p = sub.add_parser(
        "eval",
        help="metrics of a run dir / checkpoint / export (FID, KID, IS, PR, class accuracy, intra-class FID); "
        "'eval stats DATA_URL' caches the reals",
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
    p.add_argument("--classes", help="intra-class FID (ifid): comma-separated class indices (default: every class)")
    p.add_argument("--cache", help="reference statistics cache URL (default <cache>/metrics)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--jsonl", help="also append the result as one JSON line to this file (e.g. RUN_DIR/metrics.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="export G_ema as safetensors + JSON, and as ONNX / torch.export programs")
    p.add_argument("source", help="checkpoint, run dir (its newest valid checkpoint), export folder or .pkl")
    p.add_argument("--out", required=True, help="output folder (the source's own export folder: add formats to it)")
    p.add_argument(
        "--format",
        default="safetensors",
        help="comma-separated: safetensors (always written), onnx, pt2 (default safetensors)",
    )
    p.add_argument("--uint8", action="store_true", help="onnx/pt2 output uint8 NHWC images instead of float NCHW")
    p.add_argument(
        "--tolerance",
        type=float,
        metavar="T",
        help="largest accepted |exported - PyTorch| (default 1e-4; with --uint8 1 level)",
    )
    p.set_defaults(func=_cmd_export)

    from pipeline.export.sources import available_converters

    p = sub.add_parser("convert", help="convert official checkpoints to a ganpipe export folder")
    convert_sub = p.add_subparsers(dest="convert_command", required=True, metavar="FORMAT")
    for name, converter in sorted(available_converters().items()):
        s = convert_sub.add_parser(name, help=converter.help)
        s.add_argument("source", help="the file or folder to convert (any fsspec URL)")
        s.add_argument("--out", required=True, help="output folder: generator.safetensors + generator.json")
        s.add_argument(
            "--discriminator",
            action="store_true",
            help="also write D and the non-EMA G (discriminator.safetensors, generator_train.safetensors) for init=",
        )
        s.set_defaults(func=_cmd_convert)

    # Parsed by `_run_generate` once the source's family is known; listed here for `ganpipe --help`.
    sub.add_parser(
        "generate",
        add_help=False,
        help="sample images from an export, checkpoint, run dir or .pkl ('generate SRC --help': its family's options)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["generate"]:
        run = lambda: _run_generate(argv[1:])  # noqa: E731 - its options depend on the loaded generator's family
    else:
        args, extra = parser.parse_known_args(argv)
        if extra:
            # `submit RECIPE --profile NAME k=v ...`: argparse leaves KEY=VALUE after an option unparsed.
            if args.command == "submit" and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = [*args.overrides, *extra]
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
        run = lambda: args.func(args)  # noqa: E731
    # Our own messages at INFO; libraries (botocore, s3fs, urllib3, ...) only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    if argv[:1] == ["train"]:
        from pipeline.train.console import quiet_lightning

        quiet_lightning()

    from pipeline.errors import GanpipeError

    try:
        code = run()
    except SystemExit as e:  # --help, argparse's own exit, or a benchmark's failed check (its message as the code)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except GanpipeError as e:
        print(f"ganpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ganpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from pipeline.storage import describe_failure, storage_failure

        cause = storage_failure(e)  # a URL no entry point named: still one line rather than a traceback
        if cause is None:
            raise
        print(f"ganpipe: error: {describe_failure(cause)}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
