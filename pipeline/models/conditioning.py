"""Conditioning: how a training batch and a user's request become the `c` that a family's G and D take.

Kinds (`Conditioning.kind`):
    none   unconditional; c is None.
    class  integer labels (the shards' `.cls`); c is one-hot float [N, num_classes] (`encoding="onehot"`,
           StyleGAN2-ADA's convention) or int64 class indices [N] (`encoding="index"`, for embedding lookups such
           as BigGAN's).
    text   captions (the shards' `.txt`), turned into token ids in the data workers (`batch_transform`) and into
           embeddings on the device by a frozen text encoder; c is a `TextCondition` (per-token embeddings, one
           global embedding, the token mask).

Contract of every kind
    check_dataset(manifest, url)   ConfigError (naming the config key) when the data cannot give this conditioning.
    batch_transform()              a picklable callable the data workers apply to every batch dict, or None.
    from_batch(batch, device)      c of a training batch's reals.
    for_fakes(real_c)              c of a phase's fakes: by default the reals' c in a random order, i.e. drawn from
                                   the data's own distribution of labels or captions (as StyleGAN2-ADA does).
    from_request(n, request, dev)  c for `ganpipe generate`; a request that does not fit (a class for an
                                   unconditional G, no prompt for a text G) is one `SamplingError` line.
    grid(n, device)                c of the training sample grid: classes in turn, or the recipe's prompts in turn.
    for_eval(generators, device)   c of generated image i for metrics, drawn from image i's own generator, so it
                                   does not depend on the number of ranks.
    modules()                      frozen networks the conditioning runs (text encoders). The engine moves them to
                                   the device; they are never trained and never part of G, D, G_ema, optimizer
                                   state or checkpoints. `describe()` names them in exports instead of storing them.
                                   A text encoder is built on first use: checking a dataset, describing an export
                                   or tokenizing in the workers never loads its weights.
    request_flags                  the `ganpipe generate` flags a request of this kind takes (--class, --prompt).
c may be a tensor or a (named) tuple of tensors whose first dimension is the batch; `index_c` selects rows of any.

Exported graphs (`pipeline.export.graph`) take the conditioning as plain tensors a runtime without ganpipe can
build:
    graph_inputs()                 what the generator graph takes: nothing; `class_index` (int64 [N]); or the text
                                   encoder's output (`text_tokens`, `text_pooled`, `text_mask`).
    from_graph(*tensors)           c from those tensors, inside the graph (a class index becomes the one-hot or index
                                   encoding there).
    encoder_graph()                a second graph to export, token ids -> the text inputs (the frozen text encoder),
                                   or None. The tokenizer stays outside every graph: a runtime calls it first.
    graph_feed(n, request, encode) the graph inputs (numpy) for a user's request; `encode` runs the exported text
                                   encoder on token ids.
    example_requests()             requests an export is verified with (every class kind covered at both ends).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError, SamplingError
from pipeline.models.graph import BATCH, GraphTensor

Cond = Any  # None, a Tensor, or a tuple of tensors with the batch first


@dataclass(frozen=True)
class Request:
    """What a user asks `ganpipe generate` for, beyond seeds: a class index and/or a prompt."""

    class_idx: int | None = None
    prompt: str | None = None


def index_c(c: Cond, index: Tensor | slice) -> Cond:
    """Rows `index` of c, whatever its structure (None stays None)."""
    if c is None:
        return None
    if isinstance(c, Tensor):
        return c[index]
    if isinstance(c, tuple):
        parts = [index_c(x, index) for x in c]
        return type(c)(*parts) if hasattr(c, "_fields") else tuple(parts)
    raise TypeError(f"conditioning of type {type(c).__name__} cannot be indexed")


class Conditioning(abc.ABC):
    """See the module docstring."""

    kind: ClassVar[str]
    request_flags: ClassVar[tuple[str, ...]] = ()

    def check_dataset(self, manifest: Any, url: str) -> None:
        """The dataset at `url` (its `Manifest`) can give this conditioning; nothing to check by default."""
        return None

    def batch_transform(self) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        return None

    @abc.abstractmethod
    def from_batch(self, batch: dict[str, Any], device: torch.device) -> Cond: ...

    def for_fakes(self, real_c: Cond) -> Cond:
        if real_c is None:
            return None
        n = _batch_size(real_c)
        return index_c(real_c, torch.randperm(n, device=_device_of(real_c)))

    @abc.abstractmethod
    def from_request(self, n: int, request: Request, device: torch.device) -> Cond: ...

    @abc.abstractmethod
    def grid(self, n: int, device: torch.device) -> Cond: ...

    @abc.abstractmethod
    def for_eval(self, generators: Sequence[torch.Generator], device: torch.device) -> Cond: ...

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def describe(self) -> dict[str, Any]:
        """What an export records about this conditioning (JSON-able)."""
        return {"kind": self.kind}

    # Exported graphs (see the module docstring) ---------------------------------------------------------------

    def graph_inputs(self) -> list[GraphTensor]:
        return []

    def from_graph(self, *tensors: Tensor) -> Cond:
        return None

    def encoder_graph(self) -> EncoderGraph | None:
        return None

    @abc.abstractmethod
    def check_request(self, request: Request) -> None:
        """A request that does not fit this conditioning is one `SamplingError` line."""

    def graph_feed(self, n: int, request: Request, encode: EncodeTokens | None = None) -> dict[str, np.ndarray]:
        self.check_request(request)
        return {}

    def example_requests(self) -> list[Request]:
        return [Request()]


# Runs an exported text encoder: {"token_ids": int64 [N, L]} -> its outputs by name.
EncodeTokens = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class EncoderGraph:
    """A frozen network that runs before the generator graph, exported as its own graph (the text encoder)."""

    name: str  # the file stem: text_encoder.onnx, text_encoder.pt2
    module: nn.Module  # forward(*inputs) -> a tuple of the outputs, in order
    inputs: list[GraphTensor]
    outputs: list[GraphTensor]
    preprocessing: str  # how a runtime makes the inputs (the tokenizer), in words, for generator.json


def _batch_size(c: Cond) -> int:
    return c.shape[0] if isinstance(c, Tensor) else _batch_size(c[0])


def _device_of(c: Cond) -> torch.device:
    return c.device if isinstance(c, Tensor) else _device_of(c[0])


class NoConditioning(Conditioning):
    kind = "none"

    def from_batch(self, batch: dict[str, Any], device: torch.device) -> None:
        return None

    def check_request(self, request: Request) -> None:
        if request.class_idx is not None:
            raise SamplingError("this generator is unconditional: drop --class")
        if request.prompt is not None:
            raise SamplingError("this generator is unconditional: drop --prompt")

    def from_request(self, n: int, request: Request, device: torch.device) -> None:
        self.check_request(request)
        return None

    def grid(self, n: int, device: torch.device) -> None:
        return None

    def for_eval(self, generators: Sequence[torch.Generator], device: torch.device) -> None:
        return None


class ClassConditioning(Conditioning):
    """Class labels; `key` is the config key that sets the number of classes (named in errors)."""

    kind = "class"
    request_flags = ("--class",)

    def __init__(self, num_classes: int, encoding: Literal["onehot", "index"] = "onehot", key: str = "model.c_dim"):
        if num_classes < 1:
            raise ValueError(f"class conditioning needs at least one class, got {num_classes}")
        self.num_classes, self.encoding, self.key = num_classes, encoding, key

    def encode(self, labels: Tensor) -> Tensor:
        labels = labels.long()
        if self.encoding == "index":
            return labels
        return torch.nn.functional.one_hot(labels, self.num_classes).float()

    def check_dataset(self, manifest: Any, url: str) -> None:
        if not manifest.has_labels or manifest.num_classes != self.num_classes:
            classes = manifest.num_classes if manifest.has_labels else "no"
            raise ConfigError(
                f"{self.key}={self.num_classes} but the dataset at {url!r} has {classes} classes: "
                f"set {self.key} to match (0 = unconditional)"
            )

    def from_batch(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        return self.encode(batch["label"].to(device, non_blocking=True))

    def check_request(self, request: Request) -> None:
        if request.prompt is not None:
            raise SamplingError("this generator is class-conditional, not text-conditional: drop --prompt")
        if request.class_idx is None:
            raise SamplingError(f"this generator is class-conditional ({self.num_classes} classes): pass --class C")
        if not 0 <= request.class_idx < self.num_classes:
            raise SamplingError(f"--class {request.class_idx} is out of range: choose 0..{self.num_classes - 1}")

    def from_request(self, n: int, request: Request, device: torch.device) -> Tensor:
        self.check_request(request)
        return self.encode(torch.full([n], request.class_idx, device=device))

    def grid(self, n: int, device: torch.device) -> Tensor:
        return self.encode(torch.arange(n, device=device) % self.num_classes)

    def for_eval(self, generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
        labels = [int(torch.randint(self.num_classes, (1,), generator=g)) for g in generators]
        return self.encode(torch.tensor(labels, dtype=torch.long, device=device))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "encoding": self.encoding}

    def graph_inputs(self) -> list[GraphTensor]:
        return [GraphTensor("class_index", "int64", (BATCH,), f"the class of each image, 0..{self.num_classes - 1}")]

    def from_graph(self, *tensors: Tensor) -> Tensor:
        (class_index,) = tensors
        return self.encode(class_index)

    def graph_feed(self, n: int, request: Request, encode: EncodeTokens | None = None) -> dict[str, np.ndarray]:
        self.check_request(request)
        return {"class_index": np.full([n], request.class_idx, dtype=np.int64)}

    def example_requests(self) -> list[Request]:
        return [Request(class_idx=0), Request(class_idx=self.num_classes - 1)]


# ----------------------------------------------------------------------------------------------------------------
# Text


class TextCondition(NamedTuple):
    """A text encoder's output for a batch of captions."""

    tokens: Tensor  # [N, L, D] per-token embeddings
    pooled: Tensor  # [N, D'] one global embedding per caption
    mask: Tensor  # [N, L] bool, True where a token is real (not padding)


@dataclass(frozen=True)
class ByteTokenizer:
    """Captions to byte-level token ids, [N, max_length] int64: 1 = start, the UTF-8 bytes + 3, 2 = end, 0 = padding.
    A caption longer than fits is cut (its end token kept). No vocabulary file: any text, any language."""

    max_length: int = 64

    PAD: ClassVar[int] = 0
    START: ClassVar[int] = 1
    END: ClassVar[int] = 2
    VOCAB_SIZE: ClassVar[int] = 256 + 3

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        if self.max_length < 3:
            raise ValueError(f"max_length={self.max_length} leaves no room for text")
        out = np.zeros((len(captions), self.max_length), dtype=np.int64)
        for i, caption in enumerate(captions):
            body = np.frombuffer(caption.encode("utf-8"), dtype=np.uint8)[: self.max_length - 2].astype(np.int64) + 3
            out[i, 0] = self.START
            out[i, 1 : 1 + len(body)] = body
            out[i, 1 + len(body)] = self.END
        return out


@dataclass(frozen=True)
class TokenizeCaptions:
    """The data workers' batch transform: `caption` (list of str) -> `tokens` (int64 [N, L]), beside the captions."""

    tokenizer: Callable[[Sequence[str]], np.ndarray]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "caption" in batch:
            batch["tokens"] = self.tokenizer(batch["caption"])
        return batch


class TextConditioning(Conditioning):
    """Captions through `tokenizer` (in the data workers) and a frozen encoder (tokens [N, L] -> `TextCondition`,
    on the device), built by `build_encoder` on first use. `prompts` fill sample grids and evaluation; `source` is
    what an export records about the encoder (its name and where its weights come from)."""

    kind = "text"
    request_flags = ("--prompt",)

    def __init__(
        self,
        build_encoder: Callable[[], nn.Module],
        tokenizer: Callable[[Sequence[str]], np.ndarray],
        prompts: Sequence[str],
        source: dict[str, Any],
    ) -> None:
        if not prompts:
            raise ValueError("text conditioning needs at least one prompt for sample grids and evaluation")
        self.build_encoder = build_encoder
        self.tokenizer, self.prompts, self.source = tokenizer, list(prompts), dict(source)
        self._encoder: nn.Module | None = None

    @property
    def encoder(self) -> nn.Module:
        if self._encoder is None:
            self._encoder = self.build_encoder().eval().requires_grad_(False)
        return self._encoder

    def check_dataset(self, manifest: Any, url: str) -> None:
        if not manifest.has_captions:
            raise ConfigError(
                f"the dataset at {url!r} has no captions (.txt), which a text-conditional generator needs: "
                "write caption shards with `ganpipe data shards --layout captions`"
            )

    def batch_transform(self) -> TokenizeCaptions:
        return TokenizeCaptions(self.tokenizer)

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> TextCondition:
        return self.encoder(tokens)

    def encode_prompts(self, prompts: Sequence[str], device: torch.device) -> TextCondition:
        return self.encode_tokens(torch.from_numpy(self.tokenizer(prompts)).to(device))

    def from_batch(self, batch: dict[str, Any], device: torch.device) -> TextCondition:
        tokens = batch.get("tokens")
        if tokens is None:  # a batch that did not pass through the workers' transform
            return self.encode_prompts(batch["caption"], device)
        return self.encode_tokens(torch.as_tensor(tokens).to(device, non_blocking=True))

    def check_request(self, request: Request) -> None:
        if request.class_idx is not None:
            raise SamplingError("this generator is text-conditional: pass --prompt TEXT instead of --class")
        if request.prompt is None:
            raise SamplingError('this generator is text-conditional: pass --prompt "a red circle"')

    def from_request(self, n: int, request: Request, device: torch.device) -> TextCondition:
        self.check_request(request)
        return self.encode_prompts([request.prompt] * n, device)

    def grid(self, n: int, device: torch.device) -> TextCondition:
        return self.encode_prompts([self.prompts[i % len(self.prompts)] for i in range(n)], device)

    def for_eval(self, generators: Sequence[torch.Generator], device: torch.device) -> TextCondition:
        picks = [int(torch.randint(len(self.prompts), (1,), generator=g)) for g in generators]
        return self.encode_prompts([self.prompts[i] for i in picks], device)

    def modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.encoder}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": self.source}

    def graph_inputs(self) -> list[GraphTensor]:
        length = self.tokenizer([""]).shape[1]
        out = self.encode_prompts([""], torch.device("cpu"))  # the encoder's widths
        return [
            GraphTensor("text_tokens", "float32", (BATCH, length, out.tokens.shape[2]), "per-token embeddings"),
            GraphTensor("text_pooled", "float32", (BATCH, out.pooled.shape[1]), "one embedding per caption"),
            GraphTensor("text_mask", "bool", (BATCH, length), "true where a token is real, not padding"),
        ]

    def from_graph(self, *tensors: Tensor) -> TextCondition:
        tokens, pooled, mask = tensors
        return TextCondition(tokens, pooled, mask)

    def encoder_graph(self) -> EncoderGraph:
        length = self.tokenizer([""]).shape[1]
        ids = GraphTensor("token_ids", "int64", (BATCH, length), "the tokenizer's ids of each caption")
        tokenizer = repr(self.tokenizer) if isinstance(self.tokenizer, ByteTokenizer) else type(self.tokenizer).__name__
        return EncoderGraph("text_encoder", _TupleOutputs(self.encoder), [ids], self.graph_inputs(), tokenizer)

    def graph_feed(self, n: int, request: Request, encode: EncodeTokens | None = None) -> dict[str, np.ndarray]:
        self.check_request(request)
        if encode is None:
            raise SamplingError("this generator is text-conditional: its export needs the text encoder graph")
        return encode({"token_ids": self.tokenizer([request.prompt] * n)})

    def example_requests(self) -> list[Request]:
        return [Request(prompt=self.prompts[0]), Request(prompt=self.prompts[-1])]


class _TupleOutputs(nn.Module):
    """A text encoder whose `TextCondition` comes out as a plain tuple (what exporters take)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:  # *inputs: how exported graphs take their inputs
        return tuple(self.encoder(*inputs))


__all__ = [
    "ByteTokenizer",
    "ClassConditioning",
    "Cond",
    "Conditioning",
    "EncodeTokens",
    "EncoderGraph",
    "NoConditioning",
    "Request",
    "TextCondition",
    "TextConditioning",
    "TokenizeCaptions",
    "index_c",
]
