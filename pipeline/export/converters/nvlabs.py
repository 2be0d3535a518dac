"""NVIDIA network pickles -> ganpipe StyleGAN2 or StyleGAN3, without running any code from the pickle.

Reads the `network-snapshot-*.pkl` files of NVIDIA's StyleGAN2-ADA (PyTorch) and StyleGAN3 repositories (StyleGAN3
with `--cfg=stylegan2`, `--cfg=stylegan3-t` or `--cfg=stylegan3-r`): a dict with `G`, `D`, `G_ema` (and
`augment_pipe`, `training_set_kwargs`). Each network in such a pickle is a "persistent object": its reduce step
names `torch_utils.persistence._reconstruct_persistent_obj` with a dict holding the Python source of the network's
module (`module_src`), the class name (without its module) and the module's `__dict__` (parameters, buffers,
submodules and the attributes set in `__init__`, including the constructor kwargs `_init_kwargs`).

Contract:
- `read_nvlabs_pickle` unpickles with an allow-list (`ALLOWED_GLOBALS`): tensor and storage rebuilders (storages
  go through `torch.load(weights_only=True)`), `collections.OrderedDict`, `set`/`frozenset`, numpy scalars,
  dtypes and arrays, and NVIDIA's two names mapped to inert stand-ins (`PersistentObject`, `EasyDictStandIn`)
  that keep data and never execute `module_src`. Any other global stops the load with a `ConvertError` naming it.
- `generator_hparams` tells the two generators apart by their layout (`GENERATOR_LAYOUTS`: StyleGAN2's synthesis
  has blocks `b4`, `b8`, ...; StyleGAN3's (`training.networks_stylegan3.Generator`) a Fourier-feature `input` and
  layers `L0_...`), refuses any class outside that layout's NVIDIA classes by name, and maps the hyperparameters:
  StyleGAN2's from the stored attributes to a `StyleGAN2Config`, StyleGAN3's from G's constructor kwargs
  (`NVLABS_STYLEGAN3_SYNTHESIS`, NVIDIA's defaults for the ones train.py leaves out) to a `StyleGAN3Config`. A
  kwarg our config cannot express is a one-line `ConvertError` naming it; the one exception is StyleGAN3's
  `magnitude_ema_beta`, a training rate NVIDIA derives from the batch size: it becomes a note, and training from
  the weights derives it from its own batch size, as NVIDIA's `--resume` does. D is StyleGAN2's in both
  (`discriminator_hparams`).
- `convert_nvlabs` rebuilds our G (and D) through the family registry, checks for StyleGAN3 that every layer's
  design (sizes, channels, sampling rates, cutoffs, filter taps, padding, float16 flag) equals what NVIDIA's code
  computed and stored, and loads the tensors with strict key and shape checks, so a network that does not fit
  fails here with one line. It returns a `NetworkSource` of family `stylegan2` or `stylegan3`, so `init=`,
  `ganpipe eval` and `ganpipe generate` take an NVIDIA snapshot directly.
- Registered as the converter `nvlabs`: `ganpipe convert nvlabs SNAPSHOT.pkl --out DIR` writes an export folder
  (`generator.safetensors` = G_ema, plus `discriminator.safetensors` and `generator_train.safetensors` = the non-EMA
  G with `--discriminator`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from torch import Tensor

from pipeline.errors import ExportError, GanpipeError
from pipeline.export.sources import Converter, NetworkSource, register_converter
from pipeline.families import get_family
from pipeline.schema import plain_builtins, section_dict


class ConvertError(ExportError):
    """A foreign checkpoint cannot be read safely or does not map to a ganpipe network."""


class MissingPart(ConvertError):
    """A submodule or attribute that NVIDIA's class always has is absent (the generator reader adds which layout it
    expected)."""


# ----------------------------------------------------------------------------------------------------------------
# Inert stand-ins for NVIDIA's own classes


@dataclass
class PersistentObject:
    """What `_reconstruct_persistent_obj(meta)` would have rebuilt, kept as data: the class name and the object's
    `__dict__`. The embedded module source is only measured, never compiled or run."""

    class_name: str
    version: int | None
    state: dict[str, Any]
    module_src_chars: int = 0

    def child(self, name: str) -> PersistentObject | None:
        modules = self.state.get("_modules") or {}
        sub = modules.get(name)
        if sub is not None and not isinstance(sub, PersistentObject):
            raise ConvertError(f"submodule {name!r} of {self.class_name} is a {type(sub).__name__}, not a network")
        return sub

    def require_child(self, name: str) -> PersistentObject:
        sub = self.child(name)
        if sub is None:
            raise MissingPart(f"its {self.class_name} has no submodule {name!r}")
        return sub

    def attr(self, name: str, default: Any = ...) -> Any:
        if name in self.state:
            return self.state[name]
        if default is ...:
            raise MissingPart(f"its {self.class_name} has no attribute {name!r}")
        return default

    def init_kwargs(self) -> dict[str, Any]:
        return plain_builtins(self.state.get("_init_kwargs") or {})  # EasyDicts, OrderedDicts


class EasyDictStandIn(dict):
    """`dnnlib.util.EasyDict` is a dict with attribute access; as data a plain dict subclass is all it needs."""


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise ConvertError("a persistent object in the pickle has unknown metadata (expected type='class')")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise ConvertError("a persistent object in the pickle lacks its class name or state")
    src = meta.get("module_src")
    return PersistentObject(class_name, meta.get("version"), dict(state), len(src) if isinstance(src, str) else 0)


# ----------------------------------------------------------------------------------------------------------------
# Tensor and numpy rebuilders (data only)


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> Tensor:
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise ConvertError(f"a tensor in the pickle is built on a {type(storage).__name__}, not a storage")
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Tensor:
    # Parameters become plain tensors: only their values are needed, and no hooks or state are restored.
    if not isinstance(data, Tensor):
        raise ConvertError(f"a parameter in the pickle holds a {type(data).__name__}, not a tensor")
    return data.detach()


def _load_storage(payload: Any) -> Any:
    # Plain pickling of a torch storage embeds a `torch.save` of it; torch's own weights-only loader reads that.
    if not isinstance(payload, (bytes, bytearray)):
        raise ConvertError("a tensor storage in the pickle is not stored as bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices are about torch internals, not the user
        storage = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise ConvertError(f"a tensor storage in the pickle decodes to a {type(storage).__name__}")
    return storage


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise ConvertError("a numpy scalar in the pickle is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _numpy_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise ConvertError(f"a numpy array in the pickle has subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictStandIn,
    ("dnnlib", "EasyDict"): EasyDictStandIn,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; every other class or function named by the pickle is refused."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles spell some globals the Python 2 way (`__builtin__.set`): translate like pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            pass
        hint = ""
        if module.startswith("dnnlib.tflib") or module.startswith("tensorflow"):
            hint = " (a TensorFlow-era pickle: only PyTorch StyleGAN2-ADA / StyleGAN3 snapshots convert)"
        raise ConvertError(f"the pickle names {module}.{name}, which is not on the converter's allow-list{hint}")

    def persistent_load(self, pid: Any) -> Any:
        raise ConvertError("the pickle uses persistent ids (a torch.save file?): pass an NVIDIA network snapshot")


def read_nvlabs_pickle(url: str) -> dict[str, Any]:
    """Unpickle an NVIDIA snapshot with `RestrictedUnpickler`; returns its top-level dict."""
    try:
        with fsspec.open(url, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConvertError(f"{url!r} does not exist: pass an NVIDIA network-snapshot .pkl") from None
    try:
        snapshot = RestrictedUnpickler(io.BytesIO(data)).load()
    except GanpipeError:
        raise
    except Exception as e:  # truncated or non-pickle files raise many types (UnpicklingError, EOFError, ...)
        raise ConvertError(f"{url!r} is not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(snapshot, dict) or not any(isinstance(snapshot.get(k), PersistentObject) for k in ("G_ema", "G")):
        raise ConvertError(f"{url!r} is not an NVIDIA network snapshot (expected a dict with 'G_ema', 'G', 'D')")
    return snapshot


# ----------------------------------------------------------------------------------------------------------------
# What the converter knows of NVIDIA's networks

# The persistent classes of NVIDIA's network modules: StyleGAN2-ADA's `training/networks.py` (which StyleGAN3's
# `training/networks_stylegan2.py` repeats) and StyleGAN3's `training/networks_stylegan3.py`. A pickle records only
# a class's name, so an object of any other class (a fork's new layer) could compute something else under the same
# parameter names: it is refused by name rather than converted by its tensors.
STYLEGAN2_G_CLASSES = frozenset(
    {"Generator", "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer"}
    | {"ToRGBLayer", "Conv2dLayer"}
)
STYLEGAN3_G_CLASSES = frozenset(
    {"Generator", "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisInput", "SynthesisLayer"}
)
D_CLASSES = frozenset(
    {"Discriminator", "DiscriminatorBlock", "DiscriminatorEpilogue", "MinibatchStdLayer", "MappingNetwork"}
    | {"Conv2dLayer", "FullyConnectedLayer"}
)

# NVIDIA's StyleGAN3 Generator passes every kwarg but the sizes and `mapping_kwargs` to its SynthesisNetwork and
# on to each SynthesisLayer. These are all of them, with the defaults of NVIDIA's signatures (what a snapshot was
# built with when train.py left a kwarg out; ours may differ one day, so they are spelled out here). Each name but
# magnitude_ema_beta is a field of `pipeline.models.stylegan3.SynthesisConfig` with the same meaning.
NVLABS_STYLEGAN3_SYNTHESIS: dict[str, Any] = {
    "channel_base": 32768,
    "channel_max": 512,
    "num_layers": 14,
    "num_critical": 2,
    "first_cutoff": 2,
    "first_stopband": 2**2.1,
    "last_stopband_rel": 2**0.3,
    "margin_size": 10,
    "output_scale": 0.25,
    "num_fp16_res": 4,
    "conv_kernel": 3,
    "filter_size": 6,
    "lrelu_upsampling": 2,
    "use_radial_filters": False,
    "conv_clamp": 256,
    "magnitude_ema_beta": 0.999,
}
SIZE_KWARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
MAPPING_KWARGS = ("num_layers", "lr_multiplier", "w_avg_beta")  # NVIDIA's StyleGAN3 MappingNetwork options

# What NVIDIA's StyleGAN3 code computes from the kwargs and stores on each module, compared with the network we build
# from the same kwargs (`check_design`): equal designs mean equal sampling grids, filters, padding and precision.
STYLEGAN3_DESIGN: dict[str, tuple[str, ...]] = {
    "SynthesisNetwork": ("img_resolution", "img_channels", "num_layers", "num_ws", "output_scale", "layer_names"),
    "SynthesisInput": ("channels", "size", "sampling_rate", "bandwidth"),
    "SynthesisLayer": (
        "is_torgb",
        "is_critically_sampled",
        "use_fp16",
        "in_channels",
        "out_channels",
        "in_size",
        "out_size",
        "in_sampling_rate",
        "out_sampling_rate",
        "tmp_sampling_rate",
        "in_cutoff",
        "out_cutoff",
        "in_half_width",
        "out_half_width",
        "conv_kernel",
        "conv_clamp",
        "up_factor",
        "down_factor",
        "up_taps",
        "down_taps",
        "down_radial",
        "padding",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters


def state_dict_of(obj: PersistentObject, prefix: str = "") -> dict[str, Tensor]:
    """The tensors `nn.Module.state_dict()` would give: parameters, persistent buffers, then submodules."""
    out: dict[str, Tensor] = {}
    skip = set(obj.state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, t in (obj.state.get(kind) or {}).items():
            if t is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(t, Tensor):
                raise ConvertError(f"{prefix}{name} in the pickle is a {type(t).__name__}, not a tensor")
            out[f"{prefix}{name}"] = t
    for name, sub in (obj.state.get("_modules") or {}).items():
        if sub is None:
            continue
        if not isinstance(sub, PersistentObject):
            raise ConvertError(f"{prefix}{name} in the pickle is a {type(sub).__name__}, not one of NVIDIA's networks")
        out.update(state_dict_of(sub, f"{prefix}{name}."))
    return out


def check_classes(obj: PersistentObject, known: frozenset[str], what: str, path: str = "") -> None:
    """ConvertError naming the first object in `obj`'s tree whose class is not in `known`."""
    if obj.class_name not in known:
        where = f" (at {path.rstrip('.')})" if path else ""
        raise ConvertError(
            f"{what} holds a {obj.class_name}{where}, a class the converter does not know: "
            f"it reads NVIDIA's {', '.join(sorted(known))}"
        )
    for name, sub in (obj.state.get("_modules") or {}).items():
        if isinstance(sub, PersistentObject):
            check_classes(sub, known, what, f"{path}{name}.")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConvertError(f"the network uses {what}, which ganpipe's StyleGAN networks do not have")


def _check_activation(layer: PersistentObject, name: str) -> None:
    act = layer.attr("activation", "lrelu")
    _require(act == "lrelu", f"activation {act!r} in {name}")


def _channel_kwargs(kwargs: dict[str, Any]) -> tuple[int, int]:
    return int(kwargs.get("channel_base", 32768)), int(kwargs.get("channel_max", 512))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (NVIDIA computes many attributes with numpy) as Python numbers and lists."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _sizes(G: PersistentObject) -> dict[str, int]:
    return {key: int(G.attr(key)) for key in ("z_dim", "w_dim", "c_dim", "img_channels")}


def _mapping_section(mapping: PersistentObject) -> dict[str, Any]:
    """The `model.mapping` section: StyleGAN2's and StyleGAN3's mapping networks store the same attributes."""
    fc0 = mapping.require_child("fc0")
    _check_activation(fc0, "mapping.fc0")
    return {
        "num_layers": int(mapping.attr("num_layers")),
        "lr_multiplier": float(fc0.attr("bias_gain")),  # NVIDIA stores lr_multiplier as the bias gain
        "w_avg_beta": float(mapping.attr("w_avg_beta")),
    }


def _stylegan2_generator(G: PersistentObject) -> tuple[dict[str, Any], list[str]]:
    """The model section (without the discriminator) of an NVIDIA StyleGAN2 G, read from its stored attributes."""
    synthesis, mapping = G.require_child("synthesis"), G.require_child("mapping")
    kwargs = G.init_kwargs()
    # StyleGAN2-ADA nests the synthesis kwargs; StyleGAN3's StyleGAN2 generator takes them at the top level.
    synthesis_kwargs = {**kwargs, **kwargs.get("synthesis_kwargs", {})}
    channel_base, channel_max = _channel_kwargs(synthesis_kwargs)
    resolution = int(G.attr("img_resolution"))
    b4 = synthesis.require_child("b4")
    conv = b4.require_child("conv1")
    _check_activation(conv, "synthesis.b4.conv1")
    _require(bool(conv.attr("use_noise", True)), "synthesis layers without noise inputs")
    blocks = [synthesis.require_child(f"b{2**i}") for i in range(2, resolution.bit_length())]
    model = {
        **_sizes(G),
        "mapping": _mapping_section(mapping),
        "synthesis": {
            "architecture": str(b4.attr("architecture")),
            "channel_base": channel_base,
            "channel_max": channel_max,
            "conv_clamp": conv.attr("conv_clamp"),
        },
    }
    num_fp16_res = sum(bool(b.attr("use_fp16", False)) for b in blocks)
    notes = []
    if num_fp16_res:
        notes.append(f"NVIDIA ran the top {num_fp16_res} resolutions in float16; the converted weights are float32")
    return model, notes


def _stylegan3_generator(G: PersistentObject) -> tuple[dict[str, Any], list[str]]:
    """The model section (without the discriminator) of an NVIDIA StyleGAN3 G, read from its constructor kwargs."""
    mapping = G.require_child("mapping")
    if G.state.get("_init_args"):
        raise ConvertError("G was constructed with positional arguments: the converter reads NVIDIA's keyword ones")
    kwargs = {key: _plain(value) for key, value in G.init_kwargs().items()}
    sizes = {**_sizes(G), "img_resolution": int(G.attr("img_resolution"))}
    for key in SIZE_KWARGS:
        if key in kwargs and kwargs[key] != sizes[key]:
            raise ConvertError(f"G has {key}={sizes[key]} but was constructed with {kwargs[key]!r}: inconsistent")
    for key, value in (kwargs.get("mapping_kwargs") or {}).items():
        if key not in MAPPING_KWARGS:
            raise ConvertError(f"G's mapping_kwargs.{key}={value!r} has no counterpart in ganpipe's StyleGAN3")
    for key, value in kwargs.items():
        if key not in NVLABS_STYLEGAN3_SYNTHESIS and key not in SIZE_KWARGS and key != "mapping_kwargs":
            raise ConvertError(f"G's constructor argument {key}={value!r} has no counterpart in ganpipe's StyleGAN3")
    synthesis = {key: kwargs.get(key, default) for key, default in NVLABS_STYLEGAN3_SYNTHESIS.items()}
    # A training rate, not part of what the network computes; NVIDIA's own --resume also takes the new run's value.
    beta = synthesis.pop("magnitude_ema_beta")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ConvertError(f"G's constructor argument magnitude_ema_beta={beta!r} is not a decay rate in [0, 1]")
    notes = [
        f"NVIDIA trained with magnitude_ema_beta={beta:g} (from its batch size); a run that trains these weights "
        "(init=) derives it from its own batch size, as NVIDIA's --resume does"
    ]
    model = {key: sizes[key] for key in ("z_dim", "w_dim", "c_dim", "img_channels")}
    return {**model, "mapping": _mapping_section(mapping), "synthesis": synthesis}, notes


def _same(theirs: Any, ours: Any) -> bool:
    if isinstance(theirs, list) and not isinstance(ours, list):
        return len(theirs) > 0 and all(_same(t, ours) for t in theirs)  # NVIDIA's [width, height] vs our side
    if isinstance(theirs, list):
        return len(theirs) == len(ours) and all(_same(t, o) for t, o in zip(theirs, ours, strict=True))
    if isinstance(theirs, float) or isinstance(ours, float):
        return isinstance(theirs, (int, float)) and math.isclose(theirs, ours, rel_tol=1e-9, abs_tol=1e-12)
    return theirs == ours


def check_design(obj: PersistentObject, module: torch.nn.Module, attrs: dict[str, tuple[str, ...]], what: str) -> None:
    """ConvertError at the first attribute in `attrs` (by class name) where `module`, built from the pickle's
    hyperparameters, differs from the values NVIDIA's code computed and stored in `obj`, recursively."""

    def walk(obj: PersistentObject, module: torch.nn.Module, path: str) -> None:
        for name in attrs.get(obj.class_name, ()):
            theirs, ours = _plain(obj.attr(name)), _plain(getattr(module, name, None))
            if not _same(theirs, ours):
                raise ConvertError(
                    f"{what}.{path}{name} is {theirs!r} in the pickle, but ganpipe builds {ours!r} from its "
                    "hyperparameters: the snapshot's constructor kwargs do not describe its network"
                )
        for name, child in module.named_children():
            sub = obj.child(name)
            if sub is not None:
                walk(sub, child, f"{path}{name}.")

    walk(obj, module, "")


@dataclass(frozen=True)
class GeneratorLayout:
    """One of NVIDIA's generator architectures: how to recognise it, its classes, how to read its hyperparameters
    (model section without the discriminator, notes) and what to compare after building ours."""

    family: str  # the ganpipe family it converts to
    label: str  # for messages
    marker: str  # a submodule of `synthesis` only this layout has
    classes: frozenset[str]
    hparams: Callable[[PersistentObject], tuple[dict[str, Any], list[str]]]
    design: dict[str, tuple[str, ...]]  # attributes `check_design` compares; empty: read from the attributes anyway


GENERATOR_LAYOUTS = (
    GeneratorLayout("stylegan2", "StyleGAN2", "b4", STYLEGAN2_G_CLASSES, _stylegan2_generator, {}),
    GeneratorLayout(
        "stylegan3", "StyleGAN3 (alias-free)", "input", STYLEGAN3_G_CLASSES, _stylegan3_generator, STYLEGAN3_DESIGN
    ),
)


@dataclass
class GeneratorHparams:
    layout: GeneratorLayout
    model: dict[str, Any]  # the family's model section without the discriminator
    resolution: int
    notes: list[str]


def generator_hparams(G: PersistentObject, what: str = "G_ema") -> GeneratorHparams:
    """Which of NVIDIA's generators `G` is, and its hyperparameters (see `GENERATOR_LAYOUTS`)."""
    if G.class_name != "Generator":
        raise ConvertError(
            f"{what!r} is a {G.class_name}, a class the converter does not know: it reads NVIDIA's StyleGAN2 and "
            "StyleGAN3 Generator"
        )
    synthesis = G.require_child("synthesis")
    layout = next((lay for lay in GENERATOR_LAYOUTS if synthesis.child(lay.marker) is not None), None)
    if layout is None:
        raise ConvertError(
            f"{what}'s synthesis network has neither StyleGAN2's blocks (b4, ...) nor StyleGAN3's Fourier-feature "
            "input: not one of NVIDIA's generators"
        )
    check_classes(G, layout.classes, what)
    try:
        model, notes = layout.hparams(G)
        return GeneratorHparams(layout, model, int(G.attr("img_resolution")), notes)
    except MissingPart as e:
        raise ConvertError(f"{what} looks like NVIDIA's {layout.label} generator, but {e}") from None


def discriminator_hparams(D: PersistentObject, g_model: dict[str, Any], resolution: int) -> dict[str, Any]:
    """The `model.discriminator` section of an NVIDIA StyleGAN2 D (StyleGAN3 uses the same), checked against G."""
    if D.class_name != "Discriminator":
        raise ConvertError(f"'D' is a {D.class_name}, not a Discriminator")
    check_classes(D, D_CLASSES, "D")
    try:
        return _discriminator_section(D, g_model, resolution)
    except MissingPart as e:
        raise ConvertError(f"D looks like NVIDIA's StyleGAN2 discriminator, but {e}") from None


def _discriminator_section(D: PersistentObject, g_model: dict[str, Any], resolution: int) -> dict[str, Any]:
    for key in ("c_dim", "img_channels"):
        if int(D.attr(key)) != g_model[key]:
            raise ConvertError(f"D has {key}={D.attr(key)} but G has {g_model[key]}: the snapshot is inconsistent")
    if int(D.attr("img_resolution")) != resolution:
        raise ConvertError(f"D is {D.attr('img_resolution')}px but G is {resolution}px: the snapshot is inconsistent")
    channel_base, channel_max = _channel_kwargs(D.init_kwargs())
    top = D.require_child(f"b{resolution}")
    conv0 = top.require_child("conv0")
    _check_activation(conv0, f"D.b{resolution}.conv0")
    epilogue = D.require_child("b4")
    mbstd = epilogue.child("mbstd")
    group_size = mbstd.attr("group_size") if mbstd is not None else 4
    if group_size is None:
        raise ConvertError("D's minibatch-std group is the whole batch (group_size=None): ganpipe needs a number")
    cmap_dim = int(epilogue.attr("cmap_dim", 0))
    channels_4 = min(channel_base // 4, channel_max)
    if g_model["c_dim"] > 0:
        d_mapping = D.require_child("mapping")
        # Our D's label mapping has NVIDIA's default depth (8) and shares the G mapping's lr multiplier.
        _require(int(d_mapping.attr("num_layers")) == 8, f"a {d_mapping.attr('num_layers')}-layer D label mapping")
        lr = float(d_mapping.require_child("fc0").attr("bias_gain"))
        _require(abs(lr - g_model["mapping"]["lr_multiplier"]) < 1e-12, "different G and D mapping lr multipliers")
    return {
        "architecture": str(top.attr("architecture")),
        "channel_base": channel_base,
        "channel_max": channel_max,
        "conv_clamp": conv0.attr("conv_clamp"),
        "mbstd_group_size": int(group_size),
        "mbstd_num_channels": int(mbstd.attr("num_channels")) if mbstd is not None else 0,
        "cmap_dim": None if g_model["c_dim"] == 0 or cmap_dim == channels_4 else cmap_dim,
    }


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def _load_strict(module: torch.nn.Module, tensors: dict[str, Tensor], what: str, family: str) -> dict[str, Tensor]:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ConvertError(f"{what} does not fit ganpipe's {family} ({detail[:300]})") from None
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def convert_nvlabs(url: str, discriminator: Literal["required", "if_present", "skip"] = "if_present") -> NetworkSource:
    """Read an NVIDIA snapshot and return G_ema, and (unless `discriminator="skip"`) D and the non-EMA G, as ganpipe
    state dicts checked by a strict load. With "if_present", a snapshot whose D cannot be converted still gives
    G_ema (the reason is in `notes`); with "required" it is an error."""
    snapshot = read_nvlabs_pickle(url)
    G_ema = snapshot.get("G_ema") or snapshot.get("G")
    assert isinstance(G_ema, PersistentObject)  # read_nvlabs_pickle checked it
    hp = generator_hparams(G_ema)
    model, resolution, layout = hp.model, hp.resolution, hp.layout
    D = snapshot.get("D")
    notes = list(hp.notes)
    try:
        if not isinstance(D, PersistentObject):
            raise ConvertError(f"{url!r} has no discriminator 'D'")
        model["discriminator"] = discriminator_hparams(D, model, resolution)
    except ConvertError as e:
        if discriminator == "required":
            raise
        # G alone is still usable; the D section only matters to `ganpipe train init=...`.
        notes.append(f"D not converted ({e}): generator.json records ganpipe's default discriminator section")
        D = None
    family = get_family(layout.family)
    try:
        spec = family.spec(model, resolution)
    except GanpipeError as e:
        raise ConvertError(f"the network's hyperparameters are outside ganpipe's range ({e})") from None

    def generator_state(obj: PersistentObject, name: str) -> dict[str, Tensor]:
        check_classes(obj, layout.classes, name)
        module = family.build(name, spec)
        check_design(obj, module, layout.design, name)
        return _load_strict(module, state_dict_of(obj), name, layout.family)

    states = {"G_ema": generator_state(G_ema, "G_ema")}
    if discriminator != "skip" and D is not None:
        states["D"] = _load_strict(family.build("D", spec), state_dict_of(D), "D", layout.family)
        G = snapshot.get("G")
        if isinstance(G, PersistentObject) and G is not G_ema:
            states["G"] = generator_state(G, "G")
    m = re.search(r"network-snapshot-(\d+)\.pkl$", os.path.basename(url))
    kimg = float(m.group(1)) if m else 0.0  # NVIDIA names snapshots by the kimg they were taken at
    # The model section normalised through the schema: the exact dict generator.json records.
    return NetworkSource(url, layout.family, section_dict(spec.model), resolution, states, kimg, notes=notes)


NVLABS = register_converter(
    Converter(
        name="nvlabs",
        help="NVIDIA StyleGAN2-ADA / StyleGAN3 (--cfg=stylegan2, stylegan3-t, stylegan3-r) network-snapshot .pkl "
        "(never executed)",
        claims=lambda url: url.endswith(".pkl"),
        read=lambda url, training: convert_nvlabs(url, discriminator="if_present" if training else "skip"),
    )
)


__all__ = [
    "ALLOWED_GLOBALS",
    "D_CLASSES",
    "GENERATOR_LAYOUTS",
    "NVLABS",
    "NVLABS_STYLEGAN3_SYNTHESIS",
    "STYLEGAN2_G_CLASSES",
    "STYLEGAN3_DESIGN",
    "STYLEGAN3_G_CLASSES",
    "ConvertError",
    "EasyDictStandIn",
    "GeneratorHparams",
    "GeneratorLayout",
    "MissingPart",
    "PersistentObject",
    "RestrictedUnpickler",
    "check_classes",
    "check_design",
    "convert_nvlabs",
    "discriminator_hparams",
    "generator_hparams",
    "read_nvlabs_pickle",
    "state_dict_of",
]
