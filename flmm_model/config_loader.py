"""Loading a config: YAML + `key=value` overrides -> a checked, resolved `ExperimentConfig` (schema: `config.py`).

A config is loaded in three steps, all before any weights load:
1. the YAML file is read as a plain container (interpolations such as `${data.root}` kept as text);
2. command-line overrides `a.b.c=value` (list items by index: `data.train.0.root=/data`) are applied to it;
3. the container is checked against the schema's dataclasses (unknown key -> error naming the key and the closest
   known keys; wrong type -> error naming the key, the expected and the found type; a value outside its choices ->
   error listing them), merged into the schema and resolved; then the cross-field checks (`config.check_values`)
   and the per-dataset checks (`flmm_model.data.kinds`, torch-free) run.

`load_config(path, overrides)` returns a plain `ExperimentConfig` dataclass; `config_to_yaml(cfg)` writes it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flmm_model.config import ConfigError, ExperimentConfig, check_values
from flmm_model.data.kinds import check_dataset_configs

# ----------------------------------------------------------------------------------------------------------------
# Validation of a plain container against the dataclasses.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _found(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    return f"{kind} {value!r}" if not isinstance(value, (dict, list)) else kind


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, tp: Any, key: str) -> None:
    """Raise ConfigError when `value` (from YAML or an override) does not fit type `tp` at `key`."""
    if _is_interpolation(value):
        return  # checked after resolution by OmegaConf
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return
        _check(value, args[0], key)
        return
    if value is None:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        _check_dataclass(value, tp, key)
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        (item_type,) = typing.get_args(tp)
        for index, item in enumerate(value):
            _check(item, item_type, f"{key}.{index}")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")
        for sub_key, item in value.items():
            _check(item, typing.get_args(tp)[1], f"{key}.{sub_key}")
        return
    if tp is Any:
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"schema type {tp!r} at {key} is not supported by the validator")
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, found {_found(value)}")


def _unknown_key_error(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{key}: unknown key{hint} (known keys here: {', '.join(known)})")


def _check_dataclass(value: dict[str, Any], cls: type, prefix: str) -> None:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, item in value.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key_error(key, str(name), list(fields))
        _check(item, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices and item is not None and not _is_interpolation(item) and item not in choices:
            raise ConfigError(f"{key}: expected one of {choices}, found {item!r}")
    for name, fld in fields.items():
        required = fld.default is MISSING and fld.default_factory is dataclasses.MISSING
        if required and name not in value:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key}: required key missing ({fld.metadata.get('help', '')})")


def validate_container(container: dict[str, Any]) -> None:
    """Check a plain dict (a loaded YAML with overrides applied) against `ExperimentConfig`."""
    if not isinstance(container, dict):
        raise ConfigError(f"config: expected a mapping at the top level, found {_found(container)}")
    _check_dataclass(container, ExperimentConfig, "")


# ----------------------------------------------------------------------------------------------------------------
# Overrides.

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override_value(text: str) -> Any:
    """YAML scalar / flow syntax: `3`, `1e-4`, `true`, `null`, `[64, 128]`, `"a string"`, `/a/path`."""
    if text.strip() == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 1e-4 (no dot) as a string
    return value


def _schema_type_at(parts: list[str]) -> Any:
    """The schema type at a dotted key path, or raise ConfigError naming the first unknown part."""
    tp: Any = ExperimentConfig
    walked: list[str] = []
    for part in parts:
        key = ".".join(walked + [part])
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise _unknown_key_error(key, part, names)
            tp = _hints(tp)[part]
        elif origin is list:
            if not part.isdigit():
                raise ConfigError(f"{key}: {'.'.join(walked)} is a list; index it with a number (e.g. "
                                  f"{'.'.join(walked)}.0)")
            tp = typing.get_args(tp)[0]
        else:
            raise ConfigError(f"{key}: {'.'.join(walked)} is a {_type_name(tp)}, it has no sub-keys")
        walked.append(part)
    return tp


def apply_overrides(container: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a plain container (in place; also returned)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key=value (e.g. train.lr=3e-4)")
        key, text = override.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(p == "" for p in parts):
            raise ConfigError(f"override {override!r}: empty key part")
        tp = _schema_type_at(parts)
        value = parse_override_value(text)
        _check(value, tp, key)
        node: Any = container
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                index = int(part)
                if index >= len(node):
                    where = ".".join(parts[:depth])
                    raise ConfigError(f"{key}: {where} has {len(node)} items, no item {index}")
                node = node[index]
            else:
                if node.get(part) is None and parts[depth + 1].isdigit():
                    raise ConfigError(f"{key}: {'.'.join(parts[: depth + 1])} has no items in the config")
                node = node.setdefault(part, {})
                if node is None:
                    raise ConfigError(f"{key}: {'.'.join(parts[: depth + 1])} is null in the config")
        last = parts[-1]
        if isinstance(node, list):
            index = int(last)
            if index >= len(node):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} has {len(node)} items, no item {index}")
            node[index] = value
        else:
            node[last] = value
    return container


# ----------------------------------------------------------------------------------------------------------------
# Loading and saving.


def config_from_container(container: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain container, merge it into the schema, resolve interpolations: an `ExperimentConfig`."""
    validate_container(container)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(container))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from err
    check_values(cfg)
    check_dataset_configs(cfg.data)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (None = all defaults), apply `key=value` overrides, validate and resolve it."""
    container: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}")
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(path)!r}: not a text file ({err.reason} at byte {err.start}); "
                              f"expected a YAML config such as configs/demo.yaml") from err
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r}: cannot be read ({err.strerror or err})") from err
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            mark = getattr(err, "problem_mark", None)
            reason = (f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}" if mark is not None
                      else (str(err).strip().splitlines() or [""])[0])
            raise ConfigError(f"config file {str(path)!r}: not valid YAML ({reason})") from err
        container = loaded if loaded is not None else {}
    try:
        apply_overrides(container, list(overrides or []))
        return config_from_container(container)
    except ConfigError as err:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{err}{where}") from None



def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what goes into the run directory and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))



def describe_schema(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per key: `section.key (type, default): help`, for `--help`."""
    lines: list[str] = []
    hints = _hints(cls)
    for fld in dataclasses.fields(cls):
        key = f"{prefix}{fld.name}"
        tp = hints[fld.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{key}] {tp.__doc__.splitlines()[0] if tp.__doc__ else ''}")
            lines.extend(describe_schema(tp, f"{key}."))
            continue
        if fld.default is not MISSING and fld.default is not dataclasses.MISSING:
            default = "null" if fld.default is None else repr(fld.default)
        elif fld.default_factory is not dataclasses.MISSING:
            default = repr(fld.default_factory())
        else:
            default = "required"
        lines.append(f"  {key} ({_type_name(tp)}, {default}): {fld.metadata.get('help', '')}")
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            lines.extend(describe_schema(typing.get_args(tp)[0], f"    {key}.N."))
    return lines
