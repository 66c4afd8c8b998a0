"""How a conversation becomes token ids and a loss mask, for any model.

* `deepseek`: DeepSeek-V3/R1 tokenizers (they hold `<｜User｜>` and `<｜Assistant｜>` as tokens) keep the
  training format of shared/REFERENCE.md (see training/data.py): reasoning is kept in every trained turn.
* `chat-template`: every other model is rendered through its own chat template, so it trains on the
  format it is served with. The trained spans are the assistant turns, found from the template itself:
  its `{% generation %}` markers where it has them, otherwise by rendering prefixes and diffing (the
  prompt rendered with the generation prompt, then with the answer: the answer's characters are the
  difference), as TRL and axolotl do. The trained span ends with the template's end-of-turn marker,
  so the model learns to stop. A template that does not render conversations as growing prefixes
  cannot be diffed: that is reported, never guessed.

Both render batches of conversations with one tokenizer call per batch (the cache builder's unit).
A format's `fingerprint` enters the data cache key: changing the rendering rules changes FORMAT_VERSION.
"""
from __future__ import annotations

import hashlib
import re
from typing import Protocol

from clusterctl.errors import UserError

FORMAT_VERSION = 1
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

Rendered = tuple[list[int], list[int]]      # token ids, and 1 where the token is trained (else 0)


class Format(Protocol):
    name: str

    def describe(self) -> str: ...

    def fingerprint(self) -> str: ...

    def render_many(self, conversations: list[list[dict]]) -> list[Rendered]: ...


def assistant_text(message: dict) -> str:
    """The answer as DeepSeek-R1 writes it: reasoning inside <think> before the answer."""
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        return message["content"]
    return f"<think>\n{reasoning}\n</think>\n\n{message['content']}"


def _single_token(tokenizer, text: str) -> bool:
    tid = tokenizer.convert_tokens_to_ids(text)
    return tid is not None and tid != tokenizer.unk_token_id


def choose_format(tokenizer) -> Format:
    """DeepSeek's training format for DeepSeek tokenizers, else the tokenizer's own chat template."""
    if _single_token(tokenizer, USER) and _single_token(tokenizer, ASSISTANT):
        return DeepSeekFormat(tokenizer)
    if template_of(tokenizer):
        return TemplateFormat(tokenizer)
    raise UserError("the tokenizer has neither DeepSeek's role tokens nor a chat template, so there is no "
                    "format to train in", where="tokenizer_config.json",
                    fix="use the model's instruct tokenizer, or add its chat_template to tokenizer_config.json")


def template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


class DeepSeekFormat:
    """`<bos>{system}<｜User｜>{user}<｜Assistant｜>{<think>…</think>}{answer}<eos>`; trained: answer + eos."""
    name = "deepseek"

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no end-of-sentence token", where="tokenizer_config.json",
                            fix="set eos_token in the model folder's tokenizer_config.json")
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id]

    def describe(self) -> str:
        return "deepseek: DeepSeek-R1's training format (<｜User｜>/<｜Assistant｜>, reasoning kept in trained turns)"

    def fingerprint(self) -> str:
        return f"{self.name}/{FORMAT_VERSION}"

    def segments(self, messages: list[dict]) -> list[tuple[list[int], str, list[int], bool]]:
        """(ids before, text, ids after, trained) pieces of one conversation, in order."""
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        pieces: list[tuple[list[int], str, list[int], bool]] = [(self.bos, system, [], False)]
        for m in messages:
            if m["role"] == "user":
                pieces.append(([], USER + m["content"], [], False))
            elif m["role"] == "assistant":
                pieces.append(([], ASSISTANT, [], False))
                pieces.append(([], assistant_text(m), self.eos, bool(m.get("loss", True))))
        return pieces

    def render_many(self, conversations: list[list[dict]]) -> list[Rendered]:
        all_segments = [self.segments(messages) for messages in conversations]
        texts = [text for segments in all_segments for _, text, _, _ in segments]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        out = []
        for segments in all_segments:
            ids: list[int] = []
            mask: list[int] = []
            for before, _, after, trained in segments:
                piece = before + list(next(encoded)) + after
                ids += piece
                mask += [int(trained)] * len(piece)
            out.append((ids, mask))
        return out


class TemplateFormat:
    """The tokenizer's chat template; trained = each assistant turn whose `loss` is true (default)."""
    name = "chat-template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = template_of(tokenizer)
        self.markers = bool(GENERATION_MARKER.search(self.template))

    def describe(self) -> str:
        how = "its {% generation %} markers" if self.markers else "rendering prefixes and diffing"
        return f"chat-template: the tokenizer's own chat template; assistant turns found by {how}"

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.template.encode()).hexdigest()[:16]
        return f"{self.name}/{FORMAT_VERSION}/{'markers' if self.markers else 'prefix-diff'}/{digest}"

    def _render(self, messages: list[dict], *, generation_prompt: bool = False,
                spans: bool = False) -> tuple[str, list]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages], chat_template=self.template, add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=spans, **self.tokenizer.special_tokens_map)
        return rendered[0], (indices[0] if indices else [])

    def text_and_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation as text and the character spans trained on."""
        plain = [{"role": m["role"], "content": assistant_text(m) if m["role"] == "assistant" else m["content"]}
                 for m in messages]
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.markers:
            text, generated = self._render(plain, spans=True)
            if len(generated) != len(assistant_turns):
                raise ValueError(f"the chat template marked {len(generated)} generation span(s) for "
                                 f"{len(assistant_turns)} assistant turn(s)")
            return text, [span for i, span in zip(assistant_turns, generated) if messages[i].get("loss", True)]
        text, _ = self._render(plain)
        spans = []
        for i in assistant_turns:
            if not messages[i].get("loss", True):
                continue
            prompt, _ = self._render(plain[:i], generation_prompt=True)
            upto, _ = self._render(plain[:i + 1])
            if not (text.startswith(upto) and upto.startswith(prompt)):
                raise ValueError(f"the chat template does not render message {i + 1} as a continuation of the "
                                 "messages before it, so its trained tokens cannot be found")
            spans.append((len(prompt), len(upto)))
        return text, spans

    def render_many(self, conversations: list[list[dict]]) -> list[Rendered]:
        rendered = [self.text_and_spans(messages) for messages in conversations]
        encoded = self.tokenizer([text for text, _ in rendered], add_special_tokens=False,
                                 return_offsets_mapping=True)
        out = []
        for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
            out.append((ids, mask))
        return out
