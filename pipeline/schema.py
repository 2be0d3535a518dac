"""Typed config sections from plain dicts: unknown keys named with the closest valid ones, types checked by
OmegaConf, ranges checked by each dataclass's `validate(prefix)`. Every failure is one `ConfigError` line.

`parse_section(cls, raw, prefix)` is the one way a dict becomes a config dataclass: `pipeline.config` builds the
whole `Config` with it, a family parses its own `model` section with it (exports and converters need no
`Config`), and `ganpipe submit` parses cluster profiles with it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

T = TypeVar("T")


def plain_builtins(obj: Any) -> Any:
    """Dicts of any mapping type to plain dicts and tuples to lists, recursively (JSON- and YAML-friendly)."""
    if isinstance(obj, dict):
        return {k: plain_builtins(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_builtins(v) for v in obj]
    return obj


def section_dict(section: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict of builtins (safe for JSON, YAML and `torch.load(weights_only=True)`)."""
    return plain_builtins(dataclasses.asdict(section))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def valid_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, sections and their keys alike."""
    keys = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = _default(f)
        if dataclasses.is_dataclass(default):
            keys.extend(valid_keys(default, f"{name}."))
    return keys


def check_keys(node: Any, schema: Any, valid: list[str], prefix: str = "") -> None:
    """Unknown keys are the most common recipe mistake: name the key and the closest valid ones."""
    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        default = _default(fields[key])
        if dataclasses.is_dataclass(default):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{dotted}={value!r} is invalid: it is a section, give it as {dotted}.KEY=VALUE")
            check_keys(value, type(default), valid, f"{dotted}.")


def omegaconf_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or "config"
    if prefix and key != "config":
        key = f"{prefix}.{key}"
    value = getattr(e, "value", None)
    ref_type = getattr(e, "ref_type", None) or getattr(e, "object_type", None)
    msg = str(e).splitlines()[0]
    if value is not None:
        allowed = f"expected {getattr(ref_type, '__name__', ref_type)}" if ref_type else msg
        return ConfigError(f"{key}={value!r} is invalid: {allowed} ({msg})")
    return ConfigError(f"{key}: {msg}")


def parse_section(cls: type[T], raw: dict[str, Any] | None, prefix: str) -> T:
    """`raw` merged onto the defaults of dataclass `cls`, with keys, types and ranges checked; errors name keys
    as `prefix.key` (an empty prefix names them bare)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}={raw!r} is invalid: it is a section, give it as a mapping of keys to values")
    dotted = f"{prefix}." if prefix else ""
    check_keys(raw, cls, valid_keys(cls, dotted), dotted)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(raw))
        section: T = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise omegaconf_error(e, prefix) from None
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate(prefix)
    return section


__all__ = ["check_keys", "omegaconf_error", "parse_section", "plain_builtins", "section_dict", "valid_keys"]
