"""Typed settings from YAML/JSON with errors that point at the file, line and field.

Each settings class is a dataclass; `parse(cls, values, where)` refuses unknown keys and wrong
types (recursing into nested dataclasses), so every config file gets the same strict checking."""
from __future__ import annotations

import dataclasses
import json
import math
import re
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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        number = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"not UTF-8 text: byte {exc.object[exc.start]:#04x} cannot be decoded",
                          where=f"{path}:{number}",
                          fix="save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror}", where=str(path)) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", where=f"{path}{line}") from None
    except RecursionError:
        raise ConfigError("nested too deeply to be a settings file", where=str(path)) from None
    if node is None:
        return _located({}, {}, path)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("expected a mapping of keys to values", where=f"{path}:{node.start_mark.line + 1}")
    lines: dict = {}
    _collect_lines(node, "", lines)
    return _located(yaml.safe_load(text), lines, path)


def _located(values: dict, lines: dict, path: Path | str) -> Located:
    result = Located(values)
    result.lines = {key: f"{path}:{line}" for key, line in lines.items()}
    result.lines[""] = str(path)
    return result


def empty_located(label: str) -> Located:
    """The values of a file not given (built-in defaults), for overrides to be written into."""
    return _located({}, {}, label)


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


def parse(cls, values, where: str, *, lines: dict | None = None, prefix: str = ""):
    """Build dataclass `cls` from `values`, refusing unknown keys and wrong types by name, then run
    the class's own `validate(at)` (every nested section checks itself, with its file and line).

    A class lists in `INTERNAL` the fields the program derives (never set from a file) and says in
    `INTERNAL_FIX` what to do instead."""
    lines = lines if lines is not None else getattr(values, "lines", {}) or {}

    def at(field: str) -> str:
        dotted = prefix + field
        return f"{lines.get(dotted) or lines.get('') or where}: {dotted}"

    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping, got {type(values).__name__}", where=at("").rstrip(": "))
    internal = getattr(cls, "INTERNAL", ())
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in internal}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key in internal:
            raise ConfigError(f"{key} cannot be set here", where=at(str(key)),
                              fix=getattr(cls, "INTERNAL_FIX", "remove it: clusterctl sets it"))
        if key not in fields:
            raise ConfigError(f"unknown key {key!r}", where=at(str(key)),
                              fix=f"remove it or use one of: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = parse(hint, value, where, lines=lines, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(value, hint, at(key))
    result = cls(**kwargs)
    if hasattr(result, "validate"):
        result.validate(at)
    return result


_Settings = typing.TypeVar("_Settings", bound="JsonSettings")


class JsonSettings:
    """A settings dataclass that a run folder keeps as JSON (train.json): parsed, loaded and written alike."""

    @classmethod
    def from_dict(cls: type[_Settings], values: dict, *, where: str = "train.json", prefix: str = "") -> _Settings:
        """Parse and check (`parse` runs `validate`); errors name `where` (a file, or file:line) and the field."""
        return parse(cls, values, where, prefix=prefix)

    @classmethod
    def load(cls: type[_Settings], path: str | Path) -> _Settings:
        return cls.from_dict(json.loads(Path(path).read_text()), where=str(path))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"  # type: ignore[call-overload]


def dump(obj) -> dict:
    """A settings object back in file form (what `parse` reads), without its INTERNAL fields."""
    internal = getattr(obj, "INTERNAL", ())
    return {f.name: dump(value) if dataclasses.is_dataclass(value := getattr(obj, f.name)) else
            _plain(value) for f in dataclasses.fields(obj) if f.name not in internal}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


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
    if origin is float:
        return _check_float(value, where)
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


# YAML 1.1 (PyYAML) reads 1e-5 as a string; YAML 1.2 and every user read it as a number.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_float(value, where: str) -> float:
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, got {type(value).__name__} {value!r}", where=where)
    if not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value!r}", where=where)
    return float(value)


def parse_assignment(text: str, flag: str) -> tuple[str, object, str]:
    """`--set sft.lr=1e-5` -> ('sft.lr', '1e-5', '--set sft.lr=1e-5'): a dotted path, the value read
    as YAML (an empty value is the empty string), and the origin that error messages name."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    origin = f"{flag} {text}"
    if not sep or not path or not all(path.split(".")):
        raise ConfigError(f"expected KEY=VALUE with a dotted KEY, got {text!r}", where=flag,
                          fix=f"e.g. {flag} sft.lr=1e-5" if flag == "--set" else f"e.g. {flag} slurm.partition=debug")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"the value is not valid YAML: {getattr(exc, 'problem', exc)}", where=origin,
                          fix="quote it for the shell, e.g. --set 'name=\"a: b\"'") from None
    return path, value, origin


def apply_overrides(values: Located, assignments) -> Located:
    """Write (path, value, origin) assignments into a loaded file's values, before `parse` checks
    them: an override gets the same checks as the file, and its errors name the flag."""
    for path, value, origin in assignments:
        *parents, leaf = path.split(".")
        node: dict = values
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
                values.lines[".".join(parents[:depth + 1])] = origin
            if not isinstance(child, dict):
                section = ".".join(parents[:depth + 1])
                raise ConfigError(f"{section} holds {child!r}, not a section with keys", where=origin,
                                  fix=f"set {section} itself, e.g. {section}=VALUE")
            node = child
        node[leaf] = value
        values.lines.update({key: origin for key in _paths(path, value)})
    return values


def _paths(path: str, value) -> list[str]:
    if not isinstance(value, dict):
        return [path]
    return [path] + [p for key, v in value.items() for p in _paths(f"{path}.{key}", v)]


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is None:
        return getattr(hint, "__name__", str(hint))
    args = ", ".join(_type_name(a) for a in typing.get_args(hint))
    return f"{origin.__name__}[{args}]"
