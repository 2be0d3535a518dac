"""Programs derived from an export folder's weights: ONNX graphs and torch.export programs, verified before they
are written.

Contract
    `derive_formats(export_dir, formats)` builds the family's sampler from the folder's safetensors (the source of
    truth), traces its generator graph (and the text encoder's, for a text-conditional family:
    `pipeline.export.graph`) and writes each format's files into the folder:
        onnx  generator.onnx (+ text_encoder.onnx), opset `ONNX_OPSET`, standard operators only
        pt2   generator.pt2 (+ text_encoder.pt2), `torch.export.save` programs
    Before anything is written the program is run (onnxruntime; the freshly serialized `.pt2`, loaded from memory)
    on seeds 0-3 as one batch and seed 4 alone, with every example request of the conditioning and every example
    option of the sampler, and compared with `Sampler.generate` in PyTorch (float32, CPU). A difference beyond
    `tolerance` (default `DEFAULT_TOLERANCE`; for uint8 output, in levels, default 1, after the float twin passed
    at 1e-4) is an `ExportError` naming it, and no file of that format is written. `generator.json` then records
    per format: the graphs (files, inputs, outputs, sha256, preprocessing), the opset, the measured maximum
    difference, the tolerance, the batch sizes verified and the versions that wrote it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

import pipeline
from pipeline.errors import ExportError
from pipeline.export.format import ExportedGenerator, derived_files, read_export_meta, write_meta
from pipeline.export.graph import ONNX_OPSET, Graph, encoder_graph, generator_graph, to_onnx, to_pt2
from pipeline.export.runtime import GraphRunner, GraphSampler, OnnxRunner, Pt2Runner
from pipeline.export.sources import open_networks
from pipeline.imaging import to_uint8
from pipeline.models.sampling import Sampler
from pipeline.storage import publish_atomic, sha256_of

GRAPH_FORMATS = ("onnx", "pt2")
FORMATS = ("safetensors", *GRAPH_FORMATS)
DEFAULT_TOLERANCE = 1e-4  # max |exported - PyTorch| of float images in [-1, 1]
DEFAULT_TOLERANCE_UINT8 = 1  # levels: truncation to uint8 may land one level apart
VERIFY_SEEDS = ([0, 1, 2, 3], [4])  # one batch of four and one of one: the batch dimension is dynamic


def parse_formats(text: str) -> list[str]:
    """'safetensors,onnx' -> ['safetensors', 'onnx'], checked; an unknown name is one ExportError line."""
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ExportError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(names))


def _versions(fmt: str) -> dict[str, str]:
    out = {"ganpipe": pipeline.__version__, "torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        out.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return out


def _write(fmt: str, graph: Graph, folder: str) -> tuple[list[str], GraphRunner]:
    """The graph's files in the local `folder` (names), and a runner of what was written."""
    record = graph.record()
    if fmt == "onnx":
        files = to_onnx(graph, folder)
        return files, OnnxRunner(os.path.join(folder, f"{graph.name}.onnx"), record)
    program = to_pt2(graph)
    with open(os.path.join(folder, f"{graph.name}.pt2"), "wb") as fh:
        fh.write(program)
    return [f"{graph.name}.pt2"], Pt2Runner(program, record)  # run from the bytes serialized just now


def verify(sampler: Sampler, exported: GraphSampler, uint8: bool) -> float:
    """The largest difference between the exported program's images and PyTorch's (see the module docstring):
    every example request with every example option, at each batch size of VERIFY_SEEDS."""
    worst = 0.0
    for seeds in VERIFY_SEEDS:
        for request in sampler.conditioning.example_requests():
            for values in type(sampler).graph_option_examples:
                options = type(sampler).graph_sample_options(values)
                expected = sampler.generate(seeds, request, options)
                got = exported.generate(seeds, request, options)
                # uint8 output in levels: the graph's uint8 come back exactly through to_uint8.
                diff = (to_uint8(got).int() - to_uint8(expected).int()) if uint8 else got - expected
                worst = max(worst, float(diff.abs().max()))
    return worst


def check_derivable(formats: Sequence[str]) -> None:
    """One ExportError line when a derived format cannot be written here (before anything is)."""
    unknown = [f for f in formats if f not in GRAPH_FORMATS]
    if unknown:
        raise ExportError(f"cannot derive {unknown}: the derived formats are {', '.join(GRAPH_FORMATS)}")
    if "onnx" in formats:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ExportError(f"--format onnx needs {e.name}: pip install 'ganpipe[onnx]'") from None


def _verified(
    fmt: str, graphs: list[Graph], sampler: Sampler, family: str, folder: str, uint8: bool, limit: float
) -> tuple[dict[str, list[str]], float]:
    """Write `graphs` as `fmt` into the local `folder` and verify them: (files per graph, max difference)."""
    written: dict[str, list[str]] = {}
    runners: dict[str, GraphRunner] = {}
    for graph in graphs:
        written[graph.name], runners[graph.name] = _write(fmt, graph, folder)
    encoder = runners.get("text_encoder")
    exported = GraphSampler(type(sampler), sampler.conditioning, runners["generator"], encoder, family)
    diff = verify(sampler, exported, uint8)
    if not diff <= limit:
        unit = " levels" if uint8 else ""
        raise ExportError(
            f"the {fmt} program differs from PyTorch by up to {diff:.3g}{unit} (tolerance {limit:g}{unit}): no {fmt} "
            "file written; pass --tolerance to accept it, or report it"
        )
    return written, diff


def derive_formats(
    export_dir: str, formats: Sequence[str], uint8: bool = False, tolerance: float | None = None
) -> ExportedGenerator:
    """Write `formats` (of GRAPH_FORMATS) derived from the export folder's weights; see the module docstring.

    With `uint8` the float twin of the generator graph is verified first (at `tolerance` / 127.5, default
    DEFAULT_TOLERANCE): one level of uint8 rounding would otherwise hide float errors up to 1/127.5."""
    check_derivable(formats)
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE_UINT8 if uint8 else DEFAULT_TOLERANCE
    float_limit = DEFAULT_TOLERANCE if tolerance is None or not uint8 else tolerance / 127.5
    meta = read_export_meta(export_dir)
    sampler = open_networks(export_dir).sampler("cpu")
    encoder = encoder_graph(sampler.conditioning)
    extra = [encoder] if encoder is not None else []
    graphs = [generator_graph(sampler, meta.resolution, meta.img_channels, uint8), *extra]
    root = export_dir.rstrip("/")
    fs, path = fsspec.core.url_to_fs(root)
    for fmt in formats:
        with tempfile.TemporaryDirectory(prefix=f"ganpipe-{fmt}-") as folder:
            float_diff = None
            if uint8:
                twin = [generator_graph(sampler, meta.resolution, meta.img_channels, False), *extra]
                with tempfile.TemporaryDirectory(prefix=f"ganpipe-{fmt}-float-") as twin_folder:
                    float_diff = _verified(fmt, twin, sampler, meta.family, twin_folder, False, float_limit)[1]
            written, diff = _verified(fmt, graphs, sampler, meta.family, folder, uint8, limit)
            record: dict[str, Any] = {"graphs": {}}
            if fmt == "onnx":
                record["opset"] = ONNX_OPSET
            for graph in graphs:
                files = written[graph.name]
                record["graphs"][graph.name] = {
                    "files": files,
                    **graph.record(),
                    "sha256": {name: sha256_of(LocalFileSystem(), os.path.join(folder, name))[1] for name in files},
                }
            record["verified"] = {
                "max_abs_diff": diff, "tolerance": limit, "unit": "levels" if uint8 else "float",
                **({"float_max_abs_diff": float_diff, "float_tolerance": float_limit} if uint8 else {}),
                "batch_sizes": [len(s) for s in VERIFY_SEEDS], "against": "pipeline Sampler.generate, float32 CPU",
            }  # fmt: skip
            record["written_with"] = _versions(fmt)
            # The old record goes first, so that no record ever names a file being replaced; then the files,
            # then the new record, then what only the old record named.
            stale = set(derived_files(meta, fmt))
            if meta.formats.pop(fmt, None) is not None:
                write_meta(root, meta)
            for files in written.values():
                for name in files:
                    with open(os.path.join(folder, name), "rb") as fh:
                        publish_atomic(f"{root}/{name}", fh.read())
        meta.formats[fmt] = record
        write_meta(root, meta)
        for name in stale - set(derived_files(meta, fmt)):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{path.rstrip('/')}/{name}")
    return meta


__all__ = [
    "DEFAULT_TOLERANCE",
    "DEFAULT_TOLERANCE_UINT8",
    "FORMATS",
    "GRAPH_FORMATS",
    "check_derivable",
    "derive_formats",
    "parse_formats",
    "verify",
]
