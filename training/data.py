"""Chat data -> token ids + labels, in the training format of shared/REFERENCE.md.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>\\n{reasoning}\\n</think>\\n\\n{answer}<｜end▁of▁sentence｜>

Not the model's chat template: that is an inference template (R1's drops earlier turns' reasoning). BOS
and EOS are the tokenizer's own; the role and think markers are DeepSeek's strings, which DeepSeek
tokenizers hold as single tokens. Labels are -100 except on assistant turns whose `loss` is true (the
default): their answer, reasoning and end-of-sentence token. Over-long samples are truncated, never
dropped, unless truncation leaves nothing to train on. Every problem is found before training starts,
reported with its line number.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from clusterctl.errors import UserError
from clusterctl.training.config import BUILTIN_TINY_DATA, BUILTIN_TINY_MODEL

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
ROLES = ("system", "user", "assistant")
IGNORE = -100
SHIPPED_DATA = Path(__file__).with_name("data") / "tiny_reasoning.jsonl"


def resolve_data_path(data: str) -> Path:
    return SHIPPED_DATA if data == BUILTIN_TINY_DATA else Path(data)


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
    """Conversations of a JSONL file (a list of messages or {"messages": [...]} per line) or a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read the data set: {exc.strerror}", where=str(path),
                        fix="give a JSONL file of conversations (see `clusterctl data check --help`)") from exc
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list) and all(isinstance(c, list) or (isinstance(c, dict) and "messages" in c)
                                       for c in whole) and not _is_message_list(whole):
        return [_record(f"item {i + 1}", conv) for i, conv in enumerate(whole)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_record(f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append(Record(f"line {number}", None, f"not JSON: {exc.msg} at column {exc.colno}"))
    return records


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


@dataclass
class ChatFormat:
    """The tokenizer's pieces of the training format; `render` turns one conversation into a Sample."""
    tokenizer: object
    bos: list[int] = field(init=False)
    eos: list[int] = field(init=False)

    def __post_init__(self):
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise UserError("the tokenizer has no end-of-sentence token", where="tokenizer_config.json",
                            fix="set eos_token in the model folder's tokenizer_config.json")
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self.eos = [tok.eos_token_id]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, where: str, messages: list, max_length: int) -> Sample:
        ids: list[int] = []
        labels: list[int] = []

        def add(piece: list[int], trained: bool) -> None:
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE] * len(piece))

        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        add(self.bos + self.encode(system), False)
        for m in messages:
            if m["role"] == "user":
                add(self.encode(USER + m["content"]), False)
            elif m["role"] == "assistant":
                add(self.encode(ASSISTANT), False)
                add(self.encode(assistant_text(m)) + self.eos, m.get("loss", True))
        full = len(ids)
        return Sample(where, ids[:max_length], labels[:max_length], full)


def assistant_text(message: dict) -> str:
    """The answer as DeepSeek-R1 writes it: reasoning inside <think> before the answer."""
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        return message["content"]
    return f"<think>\n{reasoning}\n</think>\n\n{message['content']}"


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


def tokenize(records: list[Record], tokenizer, max_length: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, dropped): samples left with no trained token after truncation are dropped."""
    fmt = ChatFormat(tokenizer)
    kept, dropped = [], []
    for record in records:
        if record.messages is not None:
            sample = fmt.render(record.where, record.messages, max_length)
            (kept if sample.trained_tokens else dropped).append(sample)
    return kept, dropped


def load_dataset(data: str, tokenizer, max_length: int) -> list[Sample]:
    """All trainable samples, or a UserError naming every bad line before training starts."""
    path = resolve_data_path(data)
    records = read_records(path)
    bad = [r for r in records if r.error]
    kept, dropped = tokenize(records, tokenizer, max_length)
    problems = [f"{r.where}: {r.error}" for r in bad] + [
        f"{s.where}: {s.full_length} tokens; truncated to max_length {max_length}, no trained token is left"
        for s in dropped]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UserError(f"{len(problems)} conversation(s) cannot be trained on:\n  {shown}", where=str(path),
                        fix=f"fix or remove them (`clusterctl data check {path} --model MODEL` lists them all)")
    if not kept:
        raise UserError("the data set holds no conversation", where=str(path))
    return kept


def check_dataset(path: str | Path, tokenizer, max_length: int) -> dict:
    """The `clusterctl data check` report; `ok` is false when anything would be dropped."""
    path = resolve_data_path(str(path))
    records = read_records(path)
    kept, dropped = tokenize(records, tokenizer, max_length)
    lengths = sorted(s.full_length for s in kept + dropped)
    truncated = [s for s in kept if s.full_length > max_length]
    errors = [{"where": r.where, "reason": r.error} for r in records if r.error]
    return {
        "file": str(path),
        "max_length": max_length,
        "conversations": len(records),
        "trainable": len(kept),
        "errors": errors,
        "truncated": [{"where": s.where, "tokens": s.full_length,
                       "action": f"truncated to {max_length} tokens ({s.trained_tokens} trained tokens kept)"}
                      for s in truncated],
        "dropped": [{"where": s.where, "tokens": s.full_length,
                     "reason": f"truncated to {max_length} tokens, no trained token is left"} for s in dropped],
        "tokens": {
            "total": sum(len(s.input_ids) for s in kept),
            "trained": sum(s.trained_tokens for s in kept),
            "min": lengths[0] if lengths else 0,
            "max": lengths[-1] if lengths else 0,
            "mean": round(statistics.fmean(lengths), 1) if lengths else 0,
            "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))] if lengths else 0,
        },
        "ok": bool(kept) and not errors and not dropped,
    }
