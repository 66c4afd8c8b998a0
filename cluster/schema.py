"""Typed settings from YAML/JSON with errors that point at the file, line and field.

Each settings class is a dataclass; `parse(cls, values, where)` refuses unknown keys and wrong
types (recursing into nested dataclasses), so every config file gets the same strict checking."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from clusterctl.errors import ConfigError


class Located(dict):
    """A mapping loaded from YAML that remembers the line of each key (for error messages)."""

    lines: dict


def load_yaml(path: str | Path) -> Located:
    """Read a YAML mapping, keeping key line numbers; a syntax error names its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found", where=str(path), fix="check the path")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=f"{path}{line}") from None
    if node is None:
        return _located({}, {}, path)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("expected a mapping of keys to values", where=f"{path}:{node.start_mark.line + 1}")
    lines: dict = {}
    _collect_lines(node, "", lines)
    return _located(yaml.safe_load(text), lines, path)


def _located(values: dict, lines: dict, path: Path) -> Located:
    result = Located(values)
    result.lines = {key: f"{path}:{line}" for key, line in lines.items()}
    result.lines[""] = str(path)
    return result


def _collect_lines(node, prefix: str, lines: dict) -> None:
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            _collect_lines(value_node, key + ".", lines)


def where_of(values: dict, field: str, default: str) -> str:
    """'file:line: field' for a dotted field of a Located mapping, else 'default: field'."""
    lines = getattr(values, "lines", None) or {}
    place = lines.get(field) or lines.get("") or default
    return f"{place}: {field}" if field else place


def parse(cls, values, where: str, *, lines: dict | None = None, prefix: str = "", internal: tuple = ()):
    """Build dataclass `cls` from `values`, refusing unknown keys and wrong types by name.
    `internal` fields are derived by the program and may not be set from a file."""
    lines = lines if lines is not None else getattr(values, "lines", {}) or {}

    def at(field: str) -> str:
        dotted = prefix + field
        return f"{lines.get(dotted) or lines.get('') or where}: {dotted}"

    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping, got {type(values).__name__}", where=at("").rstrip(": "))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {key!r}", where=at(str(key)),
                              fix=f"remove it or use one of: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = parse(hint, value, where, lines=lines, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, at(key))
    return cls(**kwargs)


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union:  # Optional / unions: accept the first matching member
        for member in typing.get_args(hint):
            try:
                return _check_type(value, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"unexpected value {value!r}", where=where)
    if hint is typing.Any:
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected nothing, got {value!r}", where=where)
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"expected {_type_name(hint)}, got {type(value).__name__} {value!r}", where=where)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_t, value_t = typing.get_args(hint) or (typing.Any, typing.Any)
        return {_check_type(k, key_t, where): _check_type(v, value_t, f"{where}.{k}") for k, v in value.items()}
    return value


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is None:
        return getattr(hint, "__name__", str(hint))
    args = ", ".join(_type_name(a) for a in typing.get_args(hint))
    return f"{origin.__name__}[{args}]"
