"""Any model's chat format: the real Qwen2.5 and Llama 3 instruct templates (tests/data/chat_templates),
in tokenizers built here with those families' special tokens; loss on assistant turns only, token by token."""
import json
from pathlib import Path

import pytest

from clusterctl.errors import UserError
from clusterctl.training import data, datacache, formats

TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "Five.", "reasoning_content": "2 plus 3 is 5.", "loss": False},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "Eight."},
]
FAMILIES = {
    "qwen2.5": dict(template="qwen2.5-instruct.jinja", specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "llama3": dict(template="llama-3-instruct.jinja",
                   specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|eot_id|>"),
}


def build(family: str, template: str | None = None):
    """A byte-level BPE with the family's special tokens and its real chat template."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CONVERSATION] + ["system user assistant"] * 3
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=spec["specials"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in spec["specials"]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"],
                                   chat_template=template or (TEMPLATES / spec["template"]).read_text())


def pieces_to_expected(tok, pieces):
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    one = tok.convert_tokens_to_ids
    ids, trained = [], []
    for piece, is_trained in pieces:
        piece_ids = [one(piece[1:-1])] if piece.startswith("[") and piece.endswith("]") else enc(piece)
        ids += piece_ids
        trained += [int(is_trained)] * len(piece_ids)
    return ids, trained


EXPECTED = {   # (text or [special token], trained)
    "qwen2.5": [
        ("[<|im_start|>]", 0), ("system\nBe brief.", 0), ("[<|im_end|>]", 0), ("\n", 0),
        ("[<|im_start|>]", 0), ("user\nWhat is 2 + 3?", 0), ("[<|im_end|>]", 0), ("\n", 0),
        ("[<|im_start|>]", 0), ("assistant\n", 0),
        ("<think>\n2 plus 3 is 5.\n</think>\n\nFive.", 0), ("[<|im_end|>]", 0), ("\n", 0),     # loss: false
        ("[<|im_start|>]", 0), ("user\nAnd 4 + 4?", 0), ("[<|im_end|>]", 0), ("\n", 0),
        ("[<|im_start|>]", 0), ("assistant\n", 0), ("Eight.", 1), ("[<|im_end|>]", 1), ("\n", 1),
    ],
    "llama3": [
        ("[<|begin_of_text|>]", 0), ("[<|start_header_id|>]", 0), ("system", 0), ("[<|end_header_id|>]", 0),
        ("\n\nBe brief.", 0), ("[<|eot_id|>]", 0),
        ("[<|start_header_id|>]", 0), ("user", 0), ("[<|end_header_id|>]", 0), ("\n\nWhat is 2 + 3?", 0),
        ("[<|eot_id|>]", 0),
        ("[<|start_header_id|>]", 0), ("assistant", 0), ("[<|end_header_id|>]", 0),
        ("\n\n<think>\n2 plus 3 is 5.\n</think>\n\nFive.", 0), ("[<|eot_id|>]", 0),
        ("[<|start_header_id|>]", 0), ("user", 0), ("[<|end_header_id|>]", 0), ("\n\nAnd 4 + 4?", 0),
        ("[<|eot_id|>]", 0),
        ("[<|start_header_id|>]", 0), ("assistant", 0), ("[<|end_header_id|>]", 0), ("\n\n", 0), ("Eight.", 1),
        ("[<|eot_id|>]", 1),
    ],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_real_templates_train_only_assistant_turns_token_by_token(family):
    tok = build(family)
    fmt = formats.choose_format(tok)
    assert fmt.name == "chat-template" and "prefixes" in fmt.describe()
    ((ids, mask),) = fmt.render_many([CONVERSATION])
    want_ids, want_mask = pieces_to_expected(tok, EXPECTED[family])
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": m["role"], "content": formats.assistant_text(m) if m["role"] == "assistant" else m["content"]}
         for m in CONVERSATION], tokenize=False)
    assert len(ids) == len(want_ids)
    for i, (got, want, m, want_m) in enumerate(zip(ids, want_ids, mask, want_mask)):
        assert (got, m) == (want, want_m), f"token {i} {tok.convert_ids_to_tokens(got)!r}"
    sample = data.ChatFormat(tok).render("line 1", CONVERSATION, 4096)
    assert tok.decode([t for t in sample.labels if t != data.IGNORE]) == {
        "qwen2.5": "Eight.<|im_end|>\n", "llama3": "Eight.<|eot_id|>"}[family]


def test_generation_markers_are_used_where_the_template_has_them():
    marked = (TEMPLATES / "qwen2.5-instruct.jinja").read_text().replace(
        "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
        "(message.role == \"assistant\" and not message.tool_calls) %}",
        "{%- if message.role == \"assistant\" and not message.tool_calls %}\n"
        "        {{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
        "{% endgeneration %}{{- '\\n' }}\n"
        "    {%- elif (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}")
    assert marked != (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    tok = build("qwen2.5", template=marked)
    fmt = formats.choose_format(tok)
    assert "generation" in fmt.describe()
    ((ids, mask),) = fmt.render_many([CONVERSATION])
    want_ids, want_mask = pieces_to_expected(tok, EXPECTED["qwen2.5"][:-1] + [("\n", 0)])   # "\n" is outside
    assert (ids, mask) == (want_ids, want_mask)


def test_a_template_that_rewrites_earlier_turns_is_reported_by_line(tmp_path):
    """DeepSeek-R1-style templates drop earlier turns' reasoning: prefixes do not grow, nothing is guessed."""
    rewriting = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
                 "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}{{ '<|im_end|>' }}"
                 "{% endfor %}")
    tok = build("qwen2.5", template=rewriting)
    every_turn_trained = [{k: v for k, v in m.items() if k != "loss"} for m in CONVERSATION]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(every_turn_trained[1:3]) + "\n" + json.dumps(every_turn_trained) + "\n")
    report = data.check_dataset(path, tok, 4096)
    assert [e["where"] for e in report["errors"]] == ["line 2"] and report["trainable"] == 1
    assert "message 3 as a continuation" in report["errors"][0]["reason"]
    assert report["format"].startswith("chat-template")


def test_deepseek_tokenizers_keep_the_training_format(tiny_tokenizer):
    assert formats.choose_format(tiny_tokenizer).name == "deepseek"


def test_no_role_tokens_and_no_template_is_an_error():
    tok = build("qwen2.5")
    tok.chat_template = None
    with pytest.raises(UserError, match="neither DeepSeek's role tokens nor a chat template"):
        formats.choose_format(tok)


def test_the_format_is_part_of_the_cache_key(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    qwen = datacache.ensure(path, build("qwen2.5"), 4096, tmp_path / "c", workers=1, log=lambda _: None)
    llama = datacache.ensure(path, build("llama3"), 4096, tmp_path / "c", workers=1, log=lambda _: None)
    assert qwen.folder != llama.folder
    assert qwen.info["inputs"]["format"].startswith("chat-template/1/prefix-diff/")


def test_data_check_names_the_format(tmp_path):
    from click.testing import CliRunner

    from clusterctl.commands.data import command as data_command

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    result = CliRunner().invoke(data_command, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "format: deepseek: DeepSeek-R1's training format" in result.output
