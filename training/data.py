"""Chat data -> token ids + labels, in the training format of shared/REFERENCE.md.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>\\n{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>

Not the model's chat template: that is an inference template (R1's drops earlier turns' reasoning). BOS
and EOS are the tokenizer's own; the role and think markers are DeepSeek's strings, which DeepSeek
tokenizers hold as single tokens. Labels are -100 except on assistant turns whose `loss` is true (the
default): their answer, reasoning and end-of-sentence token. Over-long samples are truncated, never
dropped, unless truncation leaves nothing to train on. Every problem is found before training starts,
reported with its line number.

That is the `deepseek` format of training/formats.py; other models train in their own chat template
(formats.TemplateFormat). The trainer reads tokens from the data cache (training/datacache.py).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from clusterctl.errors import UserError
from clusterctl.training.config import BUILTIN_DATA_FILES, BUILTIN_TINY_MODEL
from clusterctl.training.formats import ASSISTANT, USER, assistant_text, choose_format

ROLES = ("system", "user", "assistant")
IGNORE = -100
SHIPPED_DATA = Path(__file__).with_name("data") / "tiny_reasoning.jsonl"


def resolve_data_path(data: str) -> Path:
    return SHIPPED_DATA.with_name(BUILTIN_DATA_FILES[data]) if data in BUILTIN_DATA_FILES else Path(data)


def load_tokenizer(model: str):
    """The tokenizer of a model folder; the built-in tiny model's is built in memory (no weights needed)."""
    if model == BUILTIN_TINY_MODEL:
        from clusterctl.training.tiny import build_tokenizer
        return build_tokenizer()
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer: {exc}", where=model,
                        fix="give a Hugging Face model folder holding tokenizer.json / tokenizer_config.json") from exc


@dataclass
class Record:
    where: str                  # "line 12" or "item 3": what reports cite
    messages: list | None
    error: str | None = None


@dataclass
class Sample:
    where: str
    input_ids: list[int]
    labels: list[int]
    full_length: int = 0         # before truncation

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def read_records(path: Path) -> list[Record]:
    """Conversations of a JSONL file (a list of messages or {"messages": [...]} per line) or a JSON array.

    Lines end at "\n" only: U+2028, U+2029 and U+0085 are valid inside JSON strings (str.splitlines would
    cut a conversation there). Undecodable bytes and over-deep nesting are reported by line, like bad JSON.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the data set: {exc.strerror}", where=str(path),
                        fix="give a JSONL file of conversations (see `clusterctl data check --help`)") from exc
    whole = _parse_whole(raw)
    if isinstance(whole, list) and all(isinstance(c, list) or (isinstance(c, dict) and "messages" in c)
                                       for c in whole) and not _is_message_list(whole):
        return [_record(f"item {i + 1}", conv) for i, conv in enumerate(whole)]
    return [line_record(f"line {number}", line) for number, line in enumerate(raw.split(b"\n"), 1)
            if line.strip()]


def _parse_whole(raw: bytes) -> object:
    """The file as one JSON document (the JSON-array form), or None when it is not one."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def line_record(where: str, line: bytes) -> Record:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(where, None, f"not UTF-8: byte {exc.start + 1} of the line (0x{line[exc.start]:02x}) cannot be "
                      "decoded (save the file as UTF-8)")
    try:
        return _record(where, json.loads(text))
    except json.JSONDecodeError as exc:
        return Record(where, None, json_error(exc))
    except RecursionError:
        return Record(where, None, "not a conversation: JSON nested too deeply")


def json_error(exc: json.JSONDecodeError) -> str:
    """'not JSON: Expecting value at column 3'; json's own messages may end in "at" ("Unterminated
    string starting at"), which must not read "at at column"."""
    return f"not JSON: {exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"


def _is_message_list(value: list) -> bool:
    return bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _record(where: str, conv) -> Record:
    messages = conv.get("messages") if isinstance(conv, dict) else conv
    if not isinstance(messages, list):
        return Record(where, None, 'expected a list of messages or {"messages": [...]}')
    error = validate(messages)
    return Record(where, None if error else messages, error)


def validate(messages: list) -> str | None:
    """The reason a conversation cannot be trained on, or None."""
    if not messages:
        return "empty conversation"
    started = False
    previous = None
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            return f"message {i}: expected an object with role and content"
        role = m.get("role")
        if role not in ROLES:
            return f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m.get("content"), str):
            return f"message {i}: content must be a string"
        extra = set(m) - {"role", "content", "reasoning_content", "loss"}
        if extra:
            return f"message {i}: unknown key(s) {', '.join(sorted(extra))}"
        if role != "assistant" and ("loss" in m or "reasoning_content" in m):
            return f"message {i}: loss/reasoning_content are only allowed on assistant messages"
        if "reasoning_content" in m and not isinstance(m["reasoning_content"], str):
            return f"message {i}: reasoning_content must be a string"
        if "loss" in m and not isinstance(m["loss"], bool):
            return f"message {i}: loss must be true or false"
        if role == "system" and started:
            return f"message {i}: system message after the conversation started (put system messages first)"
        if role == "assistant" and previous != "user":
            return f"message {i}: an assistant turn must follow a user turn"
        started = started or role != "system"
        previous = role
    if previous != "assistant":
        return "the conversation ends without an assistant answer"
    if not any(m["role"] == "assistant" and m.get("loss", True) for m in messages):
        return "no trainable turn (every assistant message has loss: false)"
    return None


class ChatFormat:
    """Renders one conversation into a Sample, in the format `formats.choose_format` picks for the tokenizer."""

    def __init__(self, tokenizer):
        self.format = choose_format(tokenizer)

    def render(self, where: str, messages: list, max_length: int) -> Sample:
        ((ids, mask),) = self.format.render_many([messages])
        labels = [t if trained else IGNORE for t, trained in zip(ids, mask)]
        return Sample(where, ids[:max_length], labels[:max_length], len(ids))


def render_text(messages: list, bos: str, eos: str) -> str:
    """The training format as one string (for comparison with the chat templates and for humans)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [bos, system]
    for m in messages:
        if m["role"] == "user":
            parts.append(USER + m["content"])
        elif m["role"] == "assistant":
            parts.append(ASSISTANT + assistant_text(m) + eos)
    return "".join(parts)


def load_dataset(data: str, tokenizer, max_length: int, *, cache_dir: Path | None = None,
                 workers: int = 1) -> Sequence[Sample]:
    """All trainable samples, or a UserError naming every bad line before training starts. With
    `cache_dir`, the samples come from the data cache (built once, memory-mapped: datacache.ensure);
    without, they are tokenized here, in memory, by the same code."""
    from clusterctl.training import datacache

    path = resolve_data_path(data)
    if cache_dir is not None:
        return datacache.require_trainable(datacache.ensure(path, tokenizer, max_length, cache_dir, workers=workers))
    parts: list = []
    report = datacache.scan(path, choose_format(tokenizer), max_length, workers=workers,
                            sink=lambda part, offset: parts.append(part))
    error = datacache.problems_error(report)
    if error is not None:
        raise error
    kind, samples = report["where_kind"], []
    for part in parts:
        bounds = np.concatenate([[0], np.cumsum(part.lengths)])
        for i, (a, b) in enumerate(pairwise(bounds)):
            ids = part.tokens[a:b].tolist()
            labels = np.where(part.trained[a:b].astype(bool), part.tokens[a:b], IGNORE).tolist()
            samples.append(Sample(f"{kind} {int(part.where[i])}", ids, labels, int(part.full[i])))
    return samples


def check_dataset(path: str | Path, tokenizer, max_length: int, *, workers: int = 1) -> dict:
    """The `clusterctl data check` report (the cache builder's own scan); `ok` is false when anything
    would be dropped. `format` says how conversations are rendered for this tokenizer."""
    from clusterctl.training import datacache

    return datacache.check(resolve_data_path(str(path)), tokenizer, max_length, workers=workers)
