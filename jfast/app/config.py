"""Typed configs at the edges: frozen dataclasses loaded from YAML and overridden by ``key=value``.

The library takes its frozen dataclasses (`BatchingConfig`, `OptimizerConfig`, ...) as they are; this module only
turns text (a YAML file, command-line words) into them and back. Every key is checked against the dataclass
fields, so a typo fails with the nearest valid key instead of being ignored, and every value is checked against
the field's annotation, so ``optimizer.learning_rate=fast`` fails before any model is loaded.

    cfg = load_config(FinetuneConfig, "sst2.yaml", ["optimizer.learning_rate=3e-5", "batching.strategy=bucket"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from jfast.errors import UserError


class ConfigError(UserError):
  """A config file or override that does not fit the config's dataclasses."""


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def field_names(cls) -> list[str]:
  """Every dotted key a config class accepts, nested sections included (``optimizer.learning_rate``)."""
  names = []
  for f in dataclasses.fields(cls):
    tp = _hints(cls)[f.name]
    if dataclasses.is_dataclass(tp):
      names += [f"{f.name}.{sub}" for sub in field_names(tp)]
    else:
      names.append(f.name)
  return names


def _unknown_key(key: str, valid: Iterable[str], where: str) -> ConfigError:
  valid = sorted(valid)
  near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f"; did you mean {near[0]!r}?" if near else ""
  return ConfigError(f"unknown config key {key!r}{where}{hint} Valid keys: {', '.join(valid)}")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Checks ``value`` against annotation ``tp``; converts only where no information is lost (text -> number)."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if value is None and type(None) in options:
      return None
    errors = []
    for option in options:
      if option is type(None):
        continue
      try:
        return _coerce(value, option, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
  if origin is typing.Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
    return value
  if origin in (tuple, list):
    args = typing.get_args(tp)
    if isinstance(value, str):
      value = [v for v in (s.strip() for s in value.split(",")) if v]
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return from_dict(tp, value, prefix=f"{key}.")
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
      return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")
  if tp is int:
    if isinstance(value, bool):
      raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
      return value
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        pass
    raise ConfigError(f"{key}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)  # YAML reads 1e-4 (no dot) as text
      except ValueError:
        pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      return str(value)
    raise ConfigError(f"{key}: expected text, got {value!r}")
  if isinstance(tp, type) and not isinstance(value, tp):
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
  return value


def from_dict(cls, data: Mapping[str, Any], *, prefix: str = ""):
  """Builds dataclass ``cls`` from a (nested) mapping; missing keys take the dataclass defaults.

  Raises:
    ConfigError: on an unknown key (naming the nearest valid one), a wrong type, or a value the dataclass's own
      validation rejects.
  """
  hints = _hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  kwargs = {}
  for key, value in data.items():
    if key not in names:
      raise _unknown_key(f"{prefix}{key}", [f"{prefix}{n}" for n in names], "")
    kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
  try:
    return cls(**kwargs)
  except (ValueError, TypeError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(config) -> dict[str, Any]:
  """Plain nested dict (tuples as lists) that `from_dict` reads back to an equal config."""

  def plain(v):
    if dataclasses.is_dataclass(v):
      return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if isinstance(v, Path):
      return str(v)
    return v

  return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
  """``a.b=value`` -> (["a", "b"], value parsed as YAML, so ``true``, ``3``, ``[1, 2]`` and ``null`` work)."""
  key, sep, raw = text.partition("=")
  if not sep or not key.strip():
    raise ConfigError(f"override {text!r} is not of the form key=value")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError:
    value = raw
  return key.strip().split("."), value


def merge_overrides(data: dict[str, Any], overrides: Iterable[str], cls) -> dict[str, Any]:
  """Applies ``key=value`` overrides to a nested dict, checking each dotted key against ``cls`` first."""
  data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy through the same representation
  valid = field_names(cls)
  for text in overrides:
    path, value = parse_override(text)
    dotted = ".".join(path)
    section_keys = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    if dotted not in valid and not (dotted in section_keys and isinstance(value, Mapping)):
      raise _unknown_key(dotted, valid, " in override")
    node = data
    for part in path[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: {part!r} is not a section")
    node[path[-1]] = value
  return data


def load_config(cls, path: str | Path | None = None, overrides: Iterable[str] = ()):
  """Reads ``cls`` from an optional YAML file, then applies ``key=value`` overrides.

  Args:
    cls: the (frozen, possibly nested) dataclass to build.
    path: a YAML file whose keys mirror the dataclass fields; None starts from the defaults.
    overrides: ``section.key=value`` strings, applied in order after the file.

  Returns:
    An instance of ``cls``.

  Example:
    >>> cfg = load_config(FinetuneConfig, None, ["optimizer.learning_rate=3e-5"])
  """
  data: dict[str, Any] = {}
  if path is not None:
    p = Path(path)
    if not p.is_file():
      raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
      data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
      raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}")
  data = merge_overrides(data, overrides, cls)
  return from_dict(cls, data)


def save_config(config, path: str | Path) -> Path:
  """Writes the resolved config as YAML; `load_config` reads it back to an equal config."""
  p = Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
  return p


def describe(cls, defaults=None) -> str:
  """One line per key with its type and default, for ``--help``."""
  defaults = defaults if defaults is not None else cls()
  lines = []
  for f in dataclasses.fields(cls):
    if not f.init:
      continue
    tp = _hints(cls)[f.name]
    value = getattr(defaults, f.name)
    if dataclasses.is_dataclass(tp):
      lines += [f"{f.name}.{line}" for line in describe(tp, value).splitlines()]
    else:
      lines.append(f"{f.name}={value!r}  ({_type_name(tp)})")
  return "\n".join(lines)
