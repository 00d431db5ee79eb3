"""Typed configuration: dataclasses filled from YAML and ``key.sub=value`` overrides.

Every config is a (nested) dataclass. Each field carries its documentation in
``field(metadata={"help": ...})`` so ``vlreason train RECIPE --help`` and the docs can
show it. Loading is strict: an unknown key is an error that names the nearest valid
key, and a value of the wrong type is an error that names the key and the type.

    cfg = load_config(GRPOConfig, "recipes/configs/grpo.yaml", ["rollout.num_generations=4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def doc(help_text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field with a help text; mutable defaults are wrapped in a factory."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": help_text}, **kwargs
        )
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(
            default_factory=lambda: dataclasses.replace(value), metadata={"help": help_text}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help_text}, **kwargs)


# Keys that moved, old dotted path -> new one: a config or override using the old path
# gets an error that names the new one (not only a nearest-name guess).
MOVED_KEYS: dict[str, str] = {
    "algorithm.prompts_per_step": "prompts_per_step",
    "sophia.prompts_per_step": "prompts_per_step",
    "grpo.prompts_per_step": "prompts_per_step",
    "sft.batch_size": "prompts_per_step",
    "cold_start.batch_size": "cold_start.prompts_per_step",
    "sft.micro_batch_size": "sft.micro_batch_prompts",
    "dvrp.divergence": "dvrp.kl_method",  # OPD's algorithm.divergence is a different thing (JSD / KL)
    "cold_start.micro_batch_size": "cold_start.micro_batch_prompts",
}


def _unknown_key(full: str, name: str, options: list[str]) -> ConfigError:
    if full in MOVED_KEYS:
        return ConfigError(f"config key '{full}' has moved: use '{MOVED_KEYS[full]}'.")
    return ConfigError(f"unknown config key '{full}'." + _suggest(name, options))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to ``tp`` or raise a ConfigError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not one of {list(choices)}."
                + _suggest(str(value), [str(c) for c in choices])
            )
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError as err:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from err
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from err
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, strictly."""
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        raise _unknown_key(f"{prefix}{key}", key, list(types_))
    kwargs = {k: _coerce(v, types_[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain-python view of a config (for YAML dumps and metrics)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any, cls: type, full: str) -> None:
    """Set ``data[path] = value``, checking every path segment against ``cls``."""
    types_ = _field_types(cls)
    head = path[0]
    if head not in types_:
        raise _unknown_key(full, head, list(types_))
    if len(path) == 1:
        data[head] = value
        return
    _, sub = _is_optional(types_[head])
    if not dataclasses.is_dataclass(sub):
        raise ConfigError(f"'{full}': '{head}' is a {_type_name(sub)}, it has no sub-keys")
    child = data.setdefault(head, {})
    if not isinstance(child, dict):
        raise ConfigError(f"'{full}': '{head}' must be a mapping")
    _set_path(child, path[1:], value, sub, full)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults of ``cls``, then the YAML file, then ``key.sub=value`` overrides."""
    data = to_dict(cls()) if path is None else _merge(to_dict(cls()), load_yaml(path), cls)
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(data, keys, value, cls, ".".join(keys))
    return from_dict(cls, data)


def _merge(base: dict[str, Any], update: dict[str, Any], cls: type, prefix: str = "") -> dict:
    types_ = _field_types(cls)
    out = dict(base)
    for key, value in update.items():
        if key not in types_:
            raise _unknown_key(f"{prefix}{key}", key, list(types_))
        _, sub = _is_optional(types_[key])
        if dataclasses.is_dataclass(sub) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, sub, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field, for ``--help`` output and docs.

    Defaults come from an instance of ``cls``, so a parent's ``default_factory`` for a
    nested config (e.g. a recipe's own rollout defaults) is what is shown."""
    defaults = cls() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), f"{prefix}{f.name}.", value))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), field_help(cls, f.name)))
    return rows


def field_help(cls: type, name: str) -> str:
    """A field's help text: its own, else that of the nearest base class declaring it (a
    subclass that only restates a default, ``max_steps: int = 40``, keeps the base's help)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""
