"""Running exported generators: onnxruntime for ONNX files, torch for `.pt2` programs ganpipe has just written.

Contract
    `OnnxRunner(path, record)` opens an ONNX graph with onnxruntime and first checks it against what
    `generator.json` records of it: input and output names, dtypes and shapes (`batch` is any size), then the
    files' sha256. A file that differs (edited or replaced after export) is refused with one `ExportError` line.
    `Pt2Runner(program, record)` runs the bytes of a torch.export program; it is only given programs this process
    serialized (`torch.export.load` unpickles, so ganpipe never loads a `.pt2` it did not just write).
    `GraphSampler` is a family's sampler over those runners: `generate`, `interpolation_frames` (in z) and the
    option checks of `Sampler`, with the conditioning's `graph_feed` making the inputs (a text prompt goes through
    the tokenizer and the text encoder graph). Images come back as `Sampler`'s do: float [-1, 1] NCHW tensors on
    the CPU, also from a uint8 NHWC graph (exactly: `to_uint8` gives its values back).
    `open_graph_sampler(export_dir, "onnx")` builds one from an export folder.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor

from pipeline.errors import ExportError, SamplingError
from pipeline.export.format import read_export_meta
from pipeline.models.conditioning import Conditioning, Request
from pipeline.models.graph import DTYPES, GraphTensor
from pipeline.models.sampling import OptionDoc, Program, SampleOptions, Sampler, option_docs
from pipeline.storage import protocols, sha256_of

_ORT_TYPES = {f"tensor({'float' if name == 'float32' else name})": name for name in DTYPES}


class GraphRunner:
    """Runs one exported graph: `run(feeds)` maps input names to numpy arrays and returns outputs by name."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.inputs = [GraphTensor.from_json(t) for t in record["inputs"]]
        self.outputs = [GraphTensor.from_json(t) for t in record["outputs"]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _describe(specs: Sequence[tuple[str, str, tuple[Any, ...]]]) -> str:
    return ", ".join(f"{name} ({dtype}, [{', '.join(map(str, shape))}])" for name, dtype, shape in specs)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


class OnnxRunner(GraphRunner):
    """An ONNX graph in onnxruntime (CPU unless `providers` says otherwise), checked against its record."""

    def __init__(self, path: str, record: dict[str, Any], providers: Sequence[str] | None = None) -> None:
        super().__init__(record)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("onnxruntime is not installed: pip install 'ganpipe[onnx]'") from None
        name = os.path.basename(path)
        try:
            self.session = ort.InferenceSession(path, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # onnxruntime raises its own types for unreadable or invalid files
            raise ExportError(f"{name} cannot be loaded by onnxruntime ({_first_line(e)})") from None
        again = "export it again (`ganpipe export DIR --out DIR --format onnx`)"
        for kind, found, expected in (
            ("inputs", self.session.get_inputs(), self.inputs),
            ("outputs", self.session.get_outputs(), self.outputs),
        ):
            have = [(a.name, _ORT_TYPES.get(a.type, a.type), tuple(a.shape)) for a in found]
            want = [(t.name, t.dtype, tuple(t.shape)) for t in expected]
            if have != want:
                raise ExportError(
                    f"{name} has {kind} {_describe(have)} but generator.json records {_describe(want)}: the file "
                    f"was changed after export; {again}"
                )
        folder = os.path.dirname(path)
        for file, digest in record.get("sha256", {}).items():  # recorded for published files only
            if sha256_of(LocalFileSystem(), os.path.join(folder, file))[1] != digest:
                raise ExportError(f"{file} is not the file exported (its sha256 differs from generator.json); {again}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run([t.name for t in self.outputs], {t.name: feeds[t.name] for t in self.inputs})
        return dict(zip([t.name for t in self.outputs], values, strict=True))


class Pt2Runner(GraphRunner):
    """A torch.export program from bytes this process serialized (see the module docstring)."""

    def __init__(self, program: bytes, record: dict[str, Any]) -> None:
        super().__init__(record)
        self.module = torch.export.load(io.BytesIO(program)).module()

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in self.inputs))
        values = out if isinstance(out, (tuple, list)) else (out,)
        return {t.name: v.numpy() for t, v in zip(self.outputs, values, strict=True)}


def as_float_images(images: np.ndarray) -> Tensor:
    """A generator graph's output as float [-1, 1] NCHW: uint8 NHWC maps back to values `to_uint8` returns as is."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype == torch.uint8:
        return (x.permute(0, 3, 1, 2).float() - 127.5) / 127.5
    return x


class GraphSampler(Sampler):
    """A family's sampler over an exported generator (see the module docstring)."""

    interpolation_spaces: ClassVar[tuple[str, ...]] = ("z",)
    can_style_mix: ClassVar[bool] = False

    def __init__(
        self,
        sampler_cls: type[Sampler],
        conditioning: Conditioning,
        generator: GraphRunner,
        encoder: GraphRunner | None = None,
        family: str = "",
    ) -> None:
        self.sampler_cls, self.conditioning, self.family = sampler_cls, conditioning, family
        self.generator, self.encoder = generator, encoder
        self.Options = sampler_cls.Options  # type: ignore[misc]  # the family's options; the graph takes some
        self._options = {t.name: t for t in generator.inputs if t.name in sampler_cls.graph_options}

    @property
    def z_dim(self) -> int:
        return int(self.generator.inputs[0].shape[1])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def offered_options(self) -> dict[str, OptionDoc]:
        """The options this graph takes as inputs (StyleGAN: the truncation psi), and the choices it fixes offered
        with their one value (so that `--trunc-center global` can be said where the family's default differs)."""
        docs = option_docs(self.Options)
        offered = {name: doc for name, doc in docs.items() if name in self._options}
        for name, value in self.sampler_cls.graph_fixed.items():
            if docs[name].choices is not None:
                offered[name] = replace(docs[name], choices=(value,), help=f"the exported graph uses {value}")
        return offered

    def _encode(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.encoder is None:
            raise SamplingError("this export has no text encoder graph: export it again with ganpipe")
        return self.encoder.run(feeds)

    def program(self, request: Request, options: SampleOptions | None = None) -> Program:
        opts = self.resolve(options)
        self.conditioning.check_request(request)
        reason = self.sampler_cls.graph_unavailable(opts, request)
        if reason is not None:
            raise SamplingError(reason)
        values = {name: np.asarray(getattr(opts, name), dtype=t.dtype) for name, t in self._options.items()}

        def run(z: Tensor, first: int) -> Tensor:
            n = z.shape[0]
            feeds = {"z": z.float().numpy(), **self.conditioning.graph_feed(n, request, self._encode), **values}
            return as_float_images(self.generator.run(feeds)["images"])

        return run

    def synthesize(self, z: Tensor, c: Any) -> Tensor:
        raise SamplingError("an exported graph draws images for a request (generate), not for a raw c")


def _local_copy(export_dir: str, name: str, keep: list[Any]) -> str:
    """The export folder's file `name` as a local path: itself when local, else downloaded into a temporary folder
    appended to `keep` (it lives as long as that list)."""
    fs, path = fsspec.core.url_to_fs(f"{export_dir.rstrip('/')}/{name}")
    if not fs.exists(path):
        raise ExportError(
            f"{name} is recorded in {export_dir}/generator.json but missing: export it again (`ganpipe export "
            f"{export_dir} --out {export_dir} --format onnx`)"
        )
    if "file" in protocols(fs):
        return path
    if not keep or not isinstance(keep[-1], tempfile.TemporaryDirectory):
        keep.append(tempfile.TemporaryDirectory(prefix="ganpipe-onnx-"))
    local = os.path.join(keep[-1].name, name)
    fs.get_file(path, local)
    return local


def open_graph_sampler(export_dir: str, fmt: str = "onnx", keep: list[Any] | None = None) -> GraphSampler:
    """The sampler of the `fmt` graphs an export folder holds (ONNX only: ganpipe never loads a `.pt2` file it did not
    write in this process). Files of a remote folder are downloaded to a temporary folder appended to `keep`,
    which must live as long as the sampler."""
    if fmt != "onnx":
        raise ExportError(f"running {fmt} files from an export folder is not supported: use onnx")
    meta = read_export_meta(export_dir)
    record = meta.formats.get(fmt)
    if record is None:
        raise ExportError(
            f"{export_dir!r} holds no {fmt} graph: add one with `ganpipe export {export_dir} --out {export_dir} "
            f"--format {fmt}`"
        )
    family = meta.family_record
    conditioning = family.build_conditioning(meta.spec())
    keep = [] if keep is None else keep
    runners: dict[str, GraphRunner] = {}
    for name, graph in record["graphs"].items():
        local = [_local_copy(export_dir, file, keep) for file in graph["files"]]  # external weights lie beside it
        runners[name] = OnnxRunner(local[0], graph)
    return GraphSampler(family.sampler, conditioning, runners["generator"], runners.get("text_encoder"), meta.family)


__all__ = [
    "GraphRunner",
    "GraphSampler",
    "OnnxRunner",
    "Pt2Runner",
    "as_float_images",
    "open_graph_sampler",
]
