"""Data of the RL and preference kinds, checked line by line before anything runs.

grpo: one JSON object per line with a `prompt` (a string, or a list of {role, content} messages) plus
any columns the reward functions read. dpo / simpo: `prompt`, `chosen`, `rejected`, each a string or a
message list (chosen/rejected: the assistant's reply). Errors cite `line N` as SFT data checks do.
No torch here.
"""
from __future__ import annotations

import json
from pathlib import Path

from clusterctl.errors import UserError

SHIPPED = Path(__file__).resolve().parent.parent / "data"
BUILTIN_DATA = {"builtin:countdown": SHIPPED / "countdown.jsonl", "builtin:tiny-dpo": SHIPPED / "tiny-dpo.jsonl"}
ROLES = ("system", "user", "assistant")


def resolve_data(data: str, output_dir: str = "") -> str:
    """A built-in data set's shipped file, or the path as given."""
    return str(BUILTIN_DATA.get(data, data))


def _text_or_messages(value, name: str) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else f"{name} is empty"
    if not isinstance(value, list) or not value:
        return f"{name} must be a string or a non-empty list of messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"{name}[{i}] must be {{\"role\": ..., \"content\": \"...\"}}"
        if message.get("role") not in ROLES:
            return f"{name}[{i}] has role {message.get('role')!r} (use one of: {', '.join(ROLES)})"
    return None


def check_prompt_row(row) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object with a prompt"
    if "prompt" not in row:
        return "no 'prompt' field"
    return _text_or_messages(row["prompt"], "prompt")


def check_preference_row(row) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object with prompt, chosen, rejected"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    for name in ("prompt", "chosen", "rejected"):
        error = _text_or_messages(row[name], name)
        if error:
            return error
    if type(row["chosen"]) is not type(row["rejected"]):
        return "chosen and rejected must both be strings or both be message lists"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical (nothing to prefer)"
    return None


def _mixed_form(row: dict, first: tuple[str, bool] | None) -> str | None:
    """One form per file: the data set loader types each column once (string or message list)."""
    if first is None or isinstance(row["prompt"], list) == first[1]:
        return None
    return (f"prompt is a {'message list' if isinstance(row['prompt'], list) else 'string'} but {first[0]}'s is "
            f"{'a message list' if first[1] else 'a string'} (use one form in the whole file)")


CHECKS = {"grpo": check_prompt_row, "dpo": check_preference_row, "simpo": check_preference_row,
          "ppo": check_prompt_row}


def read_rows(path: Path) -> list[tuple[str, object, str | None]]:
    """(where, parsed row or None, error) per non-blank line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the data set: {exc.strerror}", where=str(path)) from exc
    rows: list[tuple[str, object, str | None]] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line.decode("utf-8")), None))
        except UnicodeDecodeError:
            rows.append((f"line {number}", None, "not UTF-8"))
        except json.JSONDecodeError as exc:
            rows.append((f"line {number}", None, f"not JSON: {exc.msg} at column {exc.colno}"))
        except RecursionError:
            rows.append((f"line {number}", None, "JSON nested too deeply"))
    return rows


def check_file(path: str | Path, kind: str) -> dict:
    """Every bad line of a grpo/dpo/simpo data file, and the columns every good line has."""
    path = Path(resolve_data(str(path)))
    errors: list[dict] = []
    columns: set[str] | None = None
    good, forms = 0, None
    for where, parsed, error in read_rows(path):
        error = error or CHECKS[kind](parsed)
        row: dict = parsed if isinstance(parsed, dict) else {}
        error = error or _mixed_form(row, forms)
        if error:
            errors.append({"where": where, "reason": error})
            continue
        good += 1
        forms = forms or (where, isinstance(row["prompt"], list))
        columns = set(row) if columns is None else columns & set(row)
    if not good and not errors:
        errors.append({"where": "file", "reason": "no data lines"})
    return {"file": str(path), "kind": kind, "rows": good, "errors": errors, "columns": sorted(columns or ()),
            "ok": not errors}


def columns_of(path: str | Path, kind: str, where: str) -> list[str]:
    """The columns the data set gives every reward function; a bad file is refused naming its first bad lines."""
    report = check_file(path, kind)
    if not report["ok"]:
        shown = "; ".join(f"{e['where']}: {e['reason']}" for e in report["errors"][:3])
        more = f" (and {len(report['errors']) - 3} more)" if len(report["errors"]) > 3 else ""
        raise UserError(f"{report['file']}: {shown}{more}", where=where,
                        fix=f"run `clusterctl data check {report['file']} --kind {kind}` and fix the lines it lists")
    return report["columns"]
