"""The one registry of GAN families. A `Family` record names everything the training engine, export, metrics and
the CLI need to know about a family; none of them branches on a family's name.

A family is its networks (`pipeline/models/<name>.py`), its objective (`pipeline/objectives/<name>.py`), its
record (`pipeline/families/<name>.py`, which calls `register_family`), its recipes (`recipes/<name>/`) and, where
official weights exist, a converter in `pipeline/export/converters/`. docs/design.md, "How to add a family",
walks through it.

Where records come from (looked up on first use): every module of this package (the built-in families), the
modules named in the environment variable GANPIPE_FAMILIES (comma-separated, e.g. `mylab.gans.dcgan`: a family
kept outside ganpipe's tree; Lightning's worker processes and Slurm tasks inherit it), and the entry points of
installed packages in the group `ganpipe.families`. Each registers its record when imported.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.conditioning import Conditioning
from pipeline.models.sampling import Sampler
from pipeline.objectives.base import Objective
from pipeline.schema import parse_section

if TYPE_CHECKING:
    from pipeline.config import Config

ENV_VAR = "GANPIPE_FAMILIES"
ENTRY_POINT_GROUP = "ganpipe.families"


@dataclass(frozen=True)
class NetworkSpec:
    """What a builder sees: the family's model section, the image resolution and, while training, the whole
    config (for values derived from e.g. the batch size). `config` is None when networks are rebuilt from an
    export or a converted checkpoint, so shapes must follow from `model` and `resolution` alone."""

    model: Any
    resolution: int
    config: Config | None = None


@dataclass(frozen=True)
class Family:
    """One GAN family (see the module docstring). Builders take a `NetworkSpec`; `build_objective` and
    `build_frozen` take the whole training config."""

    name: str
    model_config: type  # the dataclass of the `model:` section
    loss_config: type  # the dataclass of the `loss:` section
    build_generator: Callable[[NetworkSpec], nn.Module]
    build_discriminator: Callable[[NetworkSpec], nn.Module]
    build_objective: Callable[[Config], Objective]
    build_conditioning: Callable[[NetworkSpec], Conditioning]  # none, class labels or text, from the model section
    sampler: type[Sampler] = Sampler  # how z and c become images (StyleGAN: W truncation, noise, style mixing)
    build_extra: Callable[[NetworkSpec], dict[str, nn.Module]] | None = None  # further trained networks
    build_frozen: Callable[[Config], dict[str, nn.Module]] | None = None  # fixed networks a loss runs
    derive_auto: Callable[[int, int], dict[str, Any]] | None = None  # (resolution, auto.gpus) -> recipe keys
    init_ignore_keys: frozenset[str] = frozenset()  # model keys `init=` may change: they steer training only
    check_config: Callable[[Config], None] | None = None  # rules across config sections that the family owns

    def parse_model(self, raw: dict[str, Any] | None, prefix: str = "model") -> Any:
        """The family's model section from a plain dict (as checkpoints and generator.json store it)."""
        return parse_section(self.model_config, raw, prefix)

    def spec(self, model: dict[str, Any] | Any, resolution: int, config: Config | None = None) -> NetworkSpec:
        parsed = model if isinstance(model, self.model_config) else self.parse_model(model)
        return NetworkSpec(parsed, resolution, config)

    def build(self, name: str, spec: NetworkSpec) -> nn.Module:
        """A freshly initialised G, G_ema or D, by its checkpoint name."""
        if name in ("G", "G_ema"):
            return self.build_generator(spec)
        if name == "D":
            return self.build_discriminator(spec)
        raise KeyError(f"{name!r} is not a network an export or init= source holds (G, G_ema, D)")

    def make_sampler(self, G: nn.Module, conditioning: Conditioning) -> Sampler:
        """The family's sampler of generator `G` (e.g. G_ema) with `conditioning` (`build_conditioning(spec)`)."""
        return self.sampler(G, conditioning, self.name)


_FAMILIES: dict[str, Family] = {}
_discovered = False


def _origin(family: Family) -> str:
    """Where a record was defined: the same file imported under two module names is the same family."""
    return inspect.getfile(family.model_config)


def register_family(family: Family) -> Family:
    """Add `family` to the registry. A name is registered once; registering it again from the same source file (a
    module imported under a second name) keeps the first record, from another file is a ConfigError."""
    known = _FAMILIES.get(family.name)
    if known is None:
        _FAMILIES[family.name] = family
        return family
    if _origin(known) != _origin(family):
        raise ConfigError(
            f"family {family.name!r} is defined twice, in {_origin(known)} and {_origin(family)}: rename one"
        )
    return known


def _discover() -> None:
    """Import every source of records once; a source that fails is a ConfigError naming it (and is retried on the
    next lookup, so the error is not replaced by "unknown family")."""
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for module in (m.strip() for m in os.environ.get(ENV_VAR, "").split(",")):
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{ENV_VAR} names {module!r}, which cannot be imported ({e}): fix the name") from None
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as e:  # any error of a third-party package's import
            dist = entry_point.dist.name if entry_point.dist is not None else "?"
            raise ConfigError(
                f"the {ENTRY_POINT_GROUP} entry point {entry_point.name!r} of package {dist!r} fails to load "
                f"({type(e).__name__}: {e}): fix or uninstall that package"
            ) from None
    _discovered = True


def family_names() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The registered family `name`; ConfigError naming the known ones otherwise."""
    _discover()
    if name not in _FAMILIES:
        close = difflib.get_close_matches(name, _FAMILIES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"family={name!r} is unknown: choose one of {', '.join(sorted(_FAMILIES))}{hint}")
    return _FAMILIES[name]


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "Family", "NetworkSpec", "family_names", "get_family", "register_family"]
