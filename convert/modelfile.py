"""An Ollama Modelfile for an exported GGUF: FROM the file, a TEMPLATE derived from the model's own chat
template, its stop tokens as PARAMETER stop lines.

Ollama templates are Go templates; a Jinja chat template cannot be translated in general, so the model's
template is rendered (sandboxed, as transformers does) with marker texts for a system prompt and a user
message, and the text around the markers becomes the Go template's fixed parts. A template it cannot
split that way gets no TEMPLATE line: Ollama then uses the chat template the GGUF carries.
"""
from __future__ import annotations

import json
from pathlib import Path

SYSTEM, PROMPT = "\x00CLUSTERCTL-SYSTEM\x00", "\x00CLUSTERCTL-PROMPT\x00"


def _token_text(value) -> str:
    """tokenizer_config.json's bos/eos entry: a string or an AddedToken-like {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def read_chat_setup(model_dir: Path) -> tuple[str, str, str]:
    """(chat template, BOS text, EOS text) of a Hugging Face folder; '' for what it lacks."""
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else ""
    jinja_file = model_dir / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))


def _render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def go_template(template: str, bos: str, eos: str) -> tuple[str, list[str]]:
    """(Ollama TEMPLATE text, extra stop texts) from a Jinja chat template; ('', []) if it cannot be split.
    The leading BOS is left out: llama.cpp adds it from the GGUF's tokenizer settings."""
    try:
        with_system = _render(template, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
                              bos, eos)
        plain = _render(template, [{"role": "user", "content": PROMPT}], bos, eos)
    except Exception:  # noqa: BLE001 - any template error means: leave TEMPLATE to the GGUF's own
        return "", []
    if with_system.count(SYSTEM) != 1 or with_system.count(PROMPT) != 1 or plain.count(PROMPT) != 1:
        return "", []
    before_system, rest = with_system.split(SYSTEM)
    between, after = rest.split(PROMPT)
    before_plain, after_plain = plain.split(PROMPT)
    if after != after_plain or with_system.index(SYSTEM) > with_system.index(PROMPT):
        return "", []
    strip = (lambda text: text[len(bos):] if bos and text.startswith(bos) else text)
    before_system, before_plain = strip(before_system), strip(before_plain)
    parts = [before_system, between, before_plain, after]
    if any('"""' in part for part in parts):
        return "", []
    escape = (lambda text: text.replace("{{", '{{ "{{" }}'))
    text = (f"{{{{ if .System }}}}{escape(before_system)}{{{{ .System }}}}{escape(between)}"
            f"{{{{ else }}}}{escape(before_plain)}{{{{ end }}}}{{{{ .Prompt }}}}{escape(after)}{{{{ .Response }}}}")
    user_marker = before_plain.strip()
    return text, [user_marker] if user_marker else []


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(gguf: Path, model_dir: Path) -> str:
    """The Modelfile beside `gguf` (FROM names it relative to the Modelfile's folder)."""
    template, bos, eos = read_chat_setup(model_dir)
    go, extra_stops = go_template(template, bos, eos) if template else ("", [])
    lines = [f"# Ollama: ollama create NAME -f {gguf.with_suffix('.Modelfile')}", f"FROM ./{gguf.name}"]
    if go:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF")
    for stop in dict.fromkeys(s for s in [eos, *extra_stops] if s):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n"
