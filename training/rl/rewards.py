"""The user's reward functions: `"rewards.py:format_reward"` (a file, taken relative to the job spec) or
`"package.module:func"` (an importable module), in TRL's reward signature:

    def reward(completions, **kwargs) -> list[float | None]

TRL calls each function with `prompts`, `completions`, `completion_ids`, every data set column but
`prompt` (one list entry per completion) and `trainer_state`, `log_extra`, `log_metric`; a function
must accept `**kwargs` (or name every one of them). The orchestrator imports the functions at submit to
check this against the data set's columns; on the nodes each function is wrapped so that an exception
names the function, the sample and the exception. No torch here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusterctl.errors import ConfigError, UserError

TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


@dataclass(frozen=True)
class RewardSpec:
    source: str          # a .py file path or a dotted module name
    function: str

    @property
    def is_file(self) -> bool:
        return self.source.endswith(".py")

    def __str__(self) -> str:
        return f"{self.source}:{self.function}"


def parse_spec(text: str, where: str) -> RewardSpec:
    source, sep, function = str(text).rpartition(":")
    if not sep or not source or not function.isidentifier():
        raise ConfigError(f"reward {text!r} is not FILE.py:FUNCTION or module.name:FUNCTION", where=where,
                          fix='e.g. rewards: ["rewards.py:format_reward"]')
    return RewardSpec(source, function)


def resolve_file(spec: RewardSpec, base: Path, where: str) -> RewardSpec:
    """A file spec with its path made absolute (relative paths are taken from `base`, the job spec's folder)."""
    if not spec.is_file:
        return spec
    path = Path(spec.source).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"reward file {path} does not exist", where=where,
                          fix="give a path relative to the job spec's folder, or an absolute one")
    return RewardSpec(str(path.resolve()), spec.function)


def load(spec: RewardSpec, where: str) -> Callable:
    """Import the function (a file is loaded under a module name of its own, so two files may share a name)."""
    if spec.is_file:
        path = Path(spec.source)
        name = f"clusterctl_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"cannot import {path}", where=where)
            module = importlib.util.module_from_spec(loader_spec)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - the user's module failed to import: say where
                raise ConfigError(f"importing {path} failed: {type(exc).__name__}: {exc}", where=where) from None
            sys.modules[name] = module
    else:
        try:
            module = importlib.import_module(spec.source)
        except ImportError as exc:
            raise ConfigError(f"cannot import module {spec.source!r}: {exc}", where=where) from None
    func = getattr(module, spec.function, None)
    if not callable(func):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{spec.source} has no function {spec.function!r}", where=where,
                          fix=f"functions there: {', '.join(found) or 'none'}")
    return func


def check_signature(func: Callable, spec: RewardSpec, columns: list[str], where: str) -> None:
    """The function accepts what TRL passes it for this data set, and needs nothing else."""
    passed = set(TRL_ARGUMENTS) | {c for c in columns if c != "prompt"}
    params = inspect.signature(func).parameters.values()
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = sorted(required - passed)
    if missing:
        raise ConfigError(f"reward {spec} needs {', '.join(missing)}, which the data set does not provide "
                          f"(columns: {', '.join(sorted(columns))})", where=where,
                          fix="add the column(s) to every data line, or give the parameter(s) a default")
    if any(p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY for p in params) and "completions" not in named:
        raise ConfigError(f"reward {spec} must take keyword arguments", where=where,
                          fix="def reward(completions, **kwargs) -> list[float | None]")
    unexpected = sorted(passed - named)
    if not takes_kwargs and unexpected:
        raise ConfigError(f"reward {spec} does not accept {', '.join(unexpected)}, which TRL passes", where=where,
                          fix="add **kwargs to its parameters: def reward(completions, **kwargs)")


def load_checked(specs: list[str], columns: list[str], *, base: Path, where: str) -> list[RewardSpec]:
    """Parse, resolve, import and signature-check every reward spec (what submit runs)."""
    resolved = []
    for i, text in enumerate(specs):
        at = f"{where}[{i}]"
        spec = resolve_file(parse_spec(text, at), base, at)
        check_signature(load(spec, at), spec, columns, at)
        resolved.append(spec)
    return resolved


class RewardError(UserError):
    """A reward function raised or returned something unusable on the nodes."""


def _excerpt(value, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def guarded(func: Callable, spec: RewardSpec) -> Callable:
    """`func` for TRL: same name (TRL logs rewards under it); an exception is re-raised as a RewardError
    naming the function, the first sample it fails on and the exception; every value must be a number
    or None, one per completion."""
    @functools.wraps(func)
    def reward(*, prompts, completions, **kwargs):
        try:
            values = list(func(prompts=prompts, completions=completions, **kwargs))
        except Exception as exc:
            index = _first_failing(func, prompts, completions, kwargs)
            raise RewardError(f"reward {spec} raised {type(exc).__name__}: {exc}",
                              where=f"sample {index}: prompt {_excerpt(prompts[index])}, completion "
                                    f"{_excerpt(completions[index])}" if index is not None else "the batch",
                              fix="fix the function or the data; rewards must return one float or None per "
                                  "completion") from exc
        if len(values) != len(completions):
            raise RewardError(f"reward {spec} returned {len(values)} values for {len(completions)} completions",
                              fix="return one float or None per completion")
        for i, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isinf(value)):
                raise RewardError(f"reward {spec} returned {value!r} for sample {i} (completion "
                                  f"{_excerpt(completions[i])})", fix="return a finite float or None")
        return values

    return reward


def _first_failing(func: Callable, prompts, completions, kwargs) -> int | None:
    """Call the function on one sample at a time to find the first one it raises on."""
    per_sample = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completions)}
    for i in range(len(completions)):
        one = {k: (v[i:i + 1] if k in per_sample else v) for k, v in kwargs.items()}
        try:
            func(prompts=prompts[i:i + 1], completions=completions[i:i + 1], **one)
        except Exception:  # noqa: BLE001 - any exception of the user's function marks the sample
            return i
    return None


def load_guarded(specs: list[str]) -> list[Callable]:
    """The node side: import already-resolved specs (absolute files or modules) and wrap them."""
    functions = []
    for i, text in enumerate(specs):
        spec = parse_spec(text, f"rewards[{i}]")
        functions.append(guarded(load(spec, f"rewards[{i}]"), spec))
    return functions
