"""What an exported program computes, and writing it as ONNX or a torch.export program (`.pt2`).

The generator graph is the generator as a user calls it: inputs `z` [batch, z_dim] float32, the conditioning's
inputs (`Conditioning.graph_inputs`: a class index, or the text encoder's output) and the sampler's scalar options
(`Sampler.graph_options`: StyleGAN's `truncation_psi`); output `images`, [batch, C, H, W] float32 in [-1, 1], or
with `uint8` [batch, H, W, C] uint8 (NVIDIA's conversion: x * 127.5 + 128, clamped, truncated). The batch
dimension is dynamic: one file serves every batch size. A text-conditional family adds the text encoder as its own
graph (`Conditioning.encoder_graph`): token ids -> the generator's text inputs; the tokenizer runs before it.

Every op of `pipeline.ops` runs its reference decomposition while a program is traced (`torch.compiler.
is_exporting()`), so an ONNX graph holds standard `ai.onnx` operators only (opset `ONNX_OPSET`); `to_onnx` checks
that. Programs are traced on the CPU in float32.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import ExportError
from pipeline.imaging import to_uint8
from pipeline.models.conditioning import Conditioning
from pipeline.models.graph import BATCH, GraphTensor
from pipeline.models.sampling import Sampler

ONNX_OPSET = 18
STANDARD_ONNX_DOMAINS = ("", "ai.onnx")
_TRACE_BATCH = 2  # traced with two rows: a batch of 1 would be specialised away


@dataclass
class Graph:
    """A network to export: `module(*inputs) -> output or tuple of outputs`, in the order of the specs."""

    name: str  # the file stem: generator, text_encoder
    module: nn.Module
    inputs: list[GraphTensor]
    outputs: list[GraphTensor]
    preprocessing: str | None = None  # what a runtime does before feeding it (the tokenizer), in words

    def example_inputs(self) -> tuple[Tensor, ...]:
        return tuple(spec.example(_TRACE_BATCH) for spec in self.inputs)

    def dynamic_shapes(self) -> tuple[tuple[dict[int, Any] | None, ...]]:
        batch = torch.export.Dim(BATCH, min=1)
        dims = tuple({spec.shape.index(BATCH): batch} if spec.batched else None for spec in self.inputs)
        return (dims,)  # one entry: forward takes *inputs

    def record(self) -> dict[str, Any]:
        """What generator.json says about this graph (the file names are added by the writer)."""
        out: dict[str, Any] = {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }
        if self.preprocessing:
            out["preprocessing"] = self.preprocessing
        return out


class GeneratorGraph(nn.Module):
    """The sampler's `graph_forward` over plain tensors: (z, *conditioning inputs, *options) -> images."""

    def __init__(self, sampler: Sampler, uint8: bool = False) -> None:
        super().__init__()
        self.G = sampler.G  # a submodule, so its weights are the program's
        self._sampler, self.uint8 = sampler, uint8
        self._num_cond = len(sampler.conditioning.graph_inputs())

    def forward(self, *inputs: Tensor) -> Tensor:
        z, cond, options = inputs[0], inputs[1 : 1 + self._num_cond], inputs[1 + self._num_cond :]
        images = self._sampler.graph_forward(z, self._sampler.conditioning.from_graph(*cond), *options)
        return to_uint8(images).permute(0, 2, 3, 1) if self.uint8 else images


def generator_graph(sampler: Sampler, resolution: int, img_channels: int, uint8: bool = False) -> Graph:
    """The generator graph of a sampler whose G is in eval mode on the CPU (see the module docstring)."""
    z = GraphTensor("z", "float32", (BATCH, sampler.z_dim), "latents: numpy.random.RandomState(seed).randn(z_dim)")
    inputs = [z, *sampler.conditioning.graph_inputs(), *sampler.graph_option_inputs()]
    if uint8:
        images = GraphTensor("images", "uint8", (BATCH, resolution, resolution, img_channels), "NHWC, 0..255")
    else:
        images = GraphTensor("images", "float32", (BATCH, img_channels, resolution, resolution), "NCHW, -1..1")
    return Graph("generator", GeneratorGraph(sampler, uint8).eval(), inputs, [images])


def encoder_graph(conditioning: Conditioning) -> Graph | None:
    """The conditioning's own graph (the text encoder), or None."""
    enc = conditioning.encoder_graph()
    if enc is None:
        return None
    return Graph(enc.name, enc.module.eval(), enc.inputs, enc.outputs, enc.preprocessing)


def _trace_failure(graph: Graph, what: str, e: Exception) -> ExportError:
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return ExportError(f"the {graph.name} graph cannot be exported as {what}: {first[:300]}")


@torch.no_grad()
def to_onnx(graph: Graph, folder: str) -> list[str]:
    """Write `graph` as `folder/NAME.onnx` (plus `NAME.onnx.data` for weights over protobuf's 2 GB); the file names
    written. Raises `ExportError` if the graph needs an operator outside the standard domains."""
    path = os.path.join(folder, f"{graph.name}.onnx")
    try:
        with warnings.catch_warnings():  # every batched input names its dimension "batch": one name, said once
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            program = torch.onnx.export(
                graph.module,
                graph.example_inputs(),
                None,
                input_names=[s.name for s in graph.inputs],
                output_names=[s.name for s in graph.outputs],
                opset_version=ONNX_OPSET,
                dynamo=True,
                dynamic_shapes=graph.dynamic_shapes(),
                verbose=False,
            )
    except Exception as e:  # torch.export and the ONNX translator raise many types
        raise _trace_failure(graph, "ONNX", e) from e
    domains = {node.domain for node in program.model_proto.graph.node} - set(STANDARD_ONNX_DOMAINS)
    if domains:
        raise ExportError(f"the {graph.name} graph uses operators outside standard ONNX ({sorted(domains)})")
    before = set(os.listdir(folder))
    program.save(path)  # external data only when the weights need it
    return sorted(set(os.listdir(folder)) - before)


@torch.no_grad()
def to_pt2(graph: Graph) -> bytes:
    """`graph` as a serialized torch.export program (`torch.export.save`)."""
    try:
        program = torch.export.export(graph.module, graph.example_inputs(), dynamic_shapes=graph.dynamic_shapes())
    except Exception as e:
        raise _trace_failure(graph, "a torch.export program", e) from e
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


__all__ = ["ONNX_OPSET", "GeneratorGraph", "Graph", "encoder_graph", "generator_graph", "to_onnx", "to_pt2"]
