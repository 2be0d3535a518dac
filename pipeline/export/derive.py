"""Programs derived from an export folder's weights: ONNX graphs and torch.export programs, verified before they
are written.

Contract
    `derive_formats(export_dir, formats)` builds the family's sampler from the folder's safetensors (the source of
    truth), traces its generator graph (and the text encoder's, for a text-conditional family:
    `pipeline.export.graph`) and writes each format's files into the folder:
        onnx  generator.onnx (+ text_encoder.onnx), opset `ONNX_OPSET`, standard operators only
        pt2   generator.pt2 (+ text_encoder.pt2), `torch.export.save` programs
    Before anything is written the program is run (onnxruntime; the freshly serialized `.pt2`, loaded from memory)
    on seeds 0-3 as one batch and seed 4 alone, across the conditioning's example requests and the sampler's
    example options, and compared with `Sampler.generate` in PyTorch (float32, CPU). A difference beyond
    `tolerance` (default `DEFAULT_TOLERANCE`; for uint8 output, in levels, default 1) is an `ExportError` naming
    it, and nothing is written. `generator.json` then records per format: the graphs (files, inputs, outputs,
    sha256, preprocessing), the opset, the measured maximum difference, the tolerance, the batch sizes verified
    and the versions that wrote it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import pipeline
from pipeline.errors import ExportError
from pipeline.export.format import ExportedGenerator, read_export_meta, write_meta
from pipeline.export.graph import ONNX_OPSET, Graph, encoder_graph, generator_graph, to_onnx, to_pt2
from pipeline.export.runtime import GraphRunner, GraphSampler, OnnxRunner, Pt2Runner
from pipeline.export.sources import open_networks
from pipeline.imaging import to_uint8
from pipeline.models.sampling import Sampler
from pipeline.storage import publish_atomic

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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
    """The largest difference between the exported program's images and PyTorch's (see the module docstring)."""
    requests = sampler.conditioning.example_requests()
    options = type(sampler).graph_option_examples
    worst = 0.0
    for i, seeds in enumerate(VERIFY_SEEDS):
        request, values = requests[i % len(requests)], options[i % len(options)]
        expected = sampler.generate(seeds, request, type(sampler).graph_sample_options(values))
        got = exported.generate(seeds, request, exported.Options(**values))
        # uint8 output in levels: the graph's uint8 come back exactly through to_uint8.
        diff = (to_uint8(got).int() - to_uint8(expected).int()) if uint8 else got - expected
        worst = max(worst, float(diff.abs().max()))
    return worst


def derive_formats(
    export_dir: str, formats: Sequence[str], uint8: bool = False, tolerance: float | None = None
) -> ExportedGenerator:
    """Write `formats` (of GRAPH_FORMATS) derived from the export folder's weights; see the module docstring."""
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
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE_UINT8 if uint8 else DEFAULT_TOLERANCE
    meta = read_export_meta(export_dir)
    sampler = open_networks(export_dir).sampler("cpu")
    graphs = [generator_graph(sampler, meta.resolution, meta.img_channels, uint8)]
    encoder = encoder_graph(sampler.conditioning)
    graphs += [encoder] if encoder is not None else []
    root = export_dir.rstrip("/")
    for fmt in formats:
        with tempfile.TemporaryDirectory(prefix=f"ganpipe-{fmt}-") as folder:
            written: dict[str, list[str]] = {}
            runners: dict[str, GraphRunner] = {}
            for graph in graphs:
                written[graph.name], runners[graph.name] = _write(fmt, graph, folder)
            exported = GraphSampler(
                type(sampler), sampler.conditioning, runners["generator"], runners.get("text_encoder"), meta.family
            )
            diff = verify(sampler, exported, uint8)
            unit = " levels" if uint8 else ""
            if not diff <= limit:
                raise ExportError(
                    f"the {fmt} program differs from PyTorch by up to {diff:.3g}{unit} (tolerance {limit:g}{unit}): "
                    "nothing written; pass --tolerance to accept it, or report it"
                )
            record: dict[str, Any] = {"graphs": {}}
            if fmt == "onnx":
                record["opset"] = ONNX_OPSET
            for graph in graphs:
                files = written[graph.name]
                record["graphs"][graph.name] = {
                    "files": files,
                    **graph.record(),
                    "sha256": {name: _sha256(os.path.join(folder, name)) for name in files},
                }
            record["verified"] = {
                "max_abs_diff": diff, "tolerance": limit, "unit": "levels" if uint8 else "float",
                "batch_sizes": [len(s) for s in VERIFY_SEEDS], "against": "pipeline Sampler.generate, float32 CPU",
            }  # fmt: skip
            record["written_with"] = _versions(fmt)
            for files in written.values():
                for name in files:
                    with open(os.path.join(folder, name), "rb") as fh:
                        publish_atomic(f"{root}/{name}", fh.read())
        meta.formats[fmt] = record
        write_meta(root, meta)  # after each format's files: a record never names a file not yet written
    return meta


__all__ = [
    "DEFAULT_TOLERANCE",
    "DEFAULT_TOLERANCE_UINT8",
    "FORMATS",
    "GRAPH_FORMATS",
    "derive_formats",
    "parse_formats",
    "verify",
]
