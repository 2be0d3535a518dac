"""The inputs and outputs of an exported generator graph, described so that a runtime without ganpipe can feed it.

A `GraphTensor` names one input or output of an exported program (ONNX, torch.export): its name, its dtype as
numpy spells it and its shape, where "batch" marks the one dynamic dimension. Conditionings and samplers declare
theirs (`Conditioning.graph_inputs`, `Sampler.graph_option_inputs`); `generator.json` records them for every
exported format, and runtimes check a file against them before running it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BATCH = "batch"  # the name of the dynamic batch dimension in every exported graph
DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of an exported generator (see the module docstring)."""

    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int | str, ...]  # ints, and BATCH for the dynamic batch dimension
    doc: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"graph tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @property
    def batched(self) -> bool:
        return BATCH in self.shape

    def example(self, batch: int) -> Tensor:
        """A tensor of this spec with `batch` rows, to trace a program with: zeros (a valid class index, token
        ids and mask; tracing treats every value as symbolic, so zeros specialize nothing)."""
        shape = [batch if d == BATCH else int(d) for d in self.shape]
        return torch.zeros(shape, dtype=DTYPES[self.dtype])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GraphTensor:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]), str(data.get("doc", "")))


__all__ = ["BATCH", "DTYPES", "GraphTensor"]
