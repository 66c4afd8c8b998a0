"""A Hugging Face config.json read for the numbers the checks need: every count a whole number of the right
size, or a UserError naming the file and the key. A list, a string or a 0 where a count belongs would
otherwise end in a TypeError or ZeroDivisionError far from its cause. Stdlib only (runs on login nodes)."""
from __future__ import annotations

import json
from pathlib import Path

from clusterctl.errors import UserError

FIX = "correct the model folder's config.json (it must be a Hugging Face causal LM config)"


def read(path: str | Path, *, fix: str = FIX) -> dict:
    """The JSON object in `path`; `fix` says what to do when it cannot be read (whose file it is)."""
    try:
        config = json.loads(Path(path).read_bytes())
    except OSError as error:
        raise UserError(f"cannot read it: {error.strerror}", where=str(path), fix=fix) from None
    except (ValueError, RecursionError) as error:     # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"not valid JSON ({str(error)[:160]})", where=str(path), fix=fix) from None
    if not isinstance(config, dict):
        raise UserError(f"expected a JSON object of settings, found a {type(config).__name__}", where=str(path),
                        fix=fix)
    return config


def count(config: dict, key: str, where: str, *, minimum: int = 1, default: int | None = None,
          fix: str = FIX) -> int:
    """config[key] as a whole number >= minimum; `default` when it is absent or null (required when None)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise UserError(f"{key} is missing", where=where, fix=fix)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key} must be a whole number of at least {minimum}, found {json.dumps(value)[:80]}",
                        where=where, fix=fix)
    return value


def text_config(config: dict, where: str, *, fix: str = FIX) -> dict:
    """The language model's settings: `text_config` of a multimodal config, else the config itself."""
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        raise UserError(f"text_config must be an object, found {json.dumps(text)[:80]}", where=where, fix=fix)
    return text
