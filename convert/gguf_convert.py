"""llama.cpp's `convert_hf_to_gguf.py`, run unchanged, with one fallback for tokenizers it does not list.

The converter names a BPE tokenizer's pre-tokenizer (the regex that splits text before the merges) by
hashing the token ids of a fixed text; a hash it does not list stops the conversion. The hash depends on
the vocabulary too, so a tokenizer trained locally (or any vocabulary not published on the Hub) is refused
even when its pre-tokenizer is GPT-2's own byte-level regex, which llama.cpp implements as `gpt-2`. Only
then, when tokenizer.json's pre-tokenizer is exactly that (a single ByteLevel with its default regex), does
this wrapper answer `gpt-2`; a listed hash (every real DeepSeek tokenizer) is answered by the converter
itself, and any other unlisted pre-tokenizer still stops it.

    python -m clusterctl.convert.gguf_convert CONVERTER_DIR MODEL_DIR [convert_hf_to_gguf.py options...]
"""
from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("clusterctl.gguf")


def is_gpt2_pre_tokenizer(tokenizer_json: Path) -> bool:
    """tokenizer.json splits text exactly as GPT-2 does: one ByteLevel pre-tokenizer, its regex on."""
    try:
        pre = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def install_fallback(model_dir: Path) -> None:
    """Wrap the converter's hash lookup: an unlisted hash of a GPT-2-style pre-tokenizer becomes `gpt-2`."""
    from conversion.base import TextModel

    listed = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return listed(self, tokenizer)
        except NotImplementedError:
            if not is_gpt2_pre_tokenizer(model_dir / "tokenizer.json"):
                raise
            log.warning("clusterctl: the tokenizer's hash is not in llama.cpp's list, but its pre-tokenizer is "
                        "GPT-2's byte-level regex: writing tokenizer.ggml.pre = gpt-2")
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter_dir, model_dir, options = Path(argv[0]), Path(argv[1]), argv[2:]
    script = converter_dir / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    install_fallback(model_dir)
    sys.argv = [str(script), str(model_dir), *options]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
