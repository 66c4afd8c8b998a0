"""Training-format rendering, loss masks token by token, validation with line numbers, `data check`."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.commands.data import command as data_command
from clusterctl.errors import UserError
from clusterctl.training import data

MODELS = Path(__file__).parents[1] / "data" / "models"   # the real DeepSeek-V3/R1 configs and chat templates
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5.", "reasoning_content": "2 plus 3 is 5.", "loss": False},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8.", "reasoning_content": "4 plus 4 is 8."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome.", "loss": True},
]


def test_masks_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]           # noqa: E731
    one = lambda marker: tok.convert_tokens_to_ids(marker)                        # noqa: E731
    bos, eos, user, assistant = tok.bos_token_id, tok.eos_token_id, one(data.USER), one(data.ASSISTANT)
    think, end_think = one("<think>"), one("</think>")
    pieces = [  # (ids, trained)
        ([bos] + enc("Be brief.") + [user] + enc("What is 2 + 3?") + [assistant], False),
        ([think] + enc("\n2 plus 3 is 5.\n") + [end_think] + enc("\n\n5.") + [eos], False),   # loss: false
        ([user] + enc("And 4 + 4?") + [assistant], False),
        ([think] + enc("\n4 plus 4 is 8.\n") + [end_think] + enc("\n\n8.") + [eos], True),
        ([user] + enc("Thanks!") + [assistant], False),
        (enc("You're welcome.") + [eos], True),
    ]
    sample = data.ChatFormat(tok).render("line 1", CONVERSATION, 4096)
    expected_ids = [t for ids, _ in pieces for t in ids]
    expected_labels = [t if trained else data.IGNORE for ids, trained in pieces for t in ids]
    assert len(sample.input_ids) == len(expected_ids)
    for i, (got, want, label, want_label) in enumerate(zip(sample.input_ids, expected_ids, sample.labels,
                                                            expected_labels)):
        assert (got, label) == (want, want_label), f"token {i} {tok.convert_ids_to_tokens(got)!r}"
    # the same ids as tokenizing the whole rendered text: piecewise encoding loses nothing at the seams
    text = data.render_text(CONVERSATION, tok.bos_token, tok.eos_token)
    assert tok(text, add_special_tokens=False)["input_ids"] == sample.input_ids
    assert tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != data.IGNORE]) == (
        f"<think>\n4 plus 4 is 8.\n</think>\n\n8.{tok.eos_token}You're welcome.{tok.eos_token}")


@pytest.mark.parametrize("model", ["deepseek-v3", "deepseek-r1"])
def test_turn_structure_matches_the_real_templates(tiny_tokenizer, model):
    """Without reasoning the training format is exactly what both real chat templates render; with it,
    V3's template agrees and R1's (an inference template) drops the earlier turns' reasoning."""
    template = json.loads((MODELS / model / "tokenizer_config.json").read_text())["chat_template"]
    tok = tiny_tokenizer
    plain = [{k: v for k, v in m.items() if k in ("role", "content")} for m in CONVERSATION]
    rendered = tok.apply_chat_template(plain, chat_template=template, tokenize=False)
    assert rendered == data.render_text(plain, tok.bos_token, tok.eos_token)
    thinking = [{"role": m["role"], "content": data.assistant_text(m) if m["role"] == "assistant" else m["content"]}
                for m in CONVERSATION]
    rendered = tok.apply_chat_template(thinking, chat_template=template, tokenize=False)
    ours = data.render_text(CONVERSATION, tok.bos_token, tok.eos_token)
    assert (rendered == ours) == (model == "deepseek-v3")
    assert "4 plus 4 is 8." in ours


BAD_LINES = [
    ("not json", "line 1: not JSON"),
    ("[]", "line 2: empty conversation"),
    ('[{"role": "tool", "content": "x"}]', "line 3: message 1: unknown role 'tool'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": false}]}',
     "line 4: no trainable turn"),
    ('[{"role": "assistant", "content": "b"}]', "line 5: message 1: an assistant turn must follow a user turn"),
    ('[{"role": "user", "content": "a"}]', "line 6: the conversation ends without an assistant answer"),
    ('{"conversation": []}', 'line 7: expected a list of messages'),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]',
     "line 8: message 2: system message after the conversation started"),
    ('[{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]', "line 9: message 1: content must"),
]
GOOD = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]'


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_line_is_reported_before_training(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, ""] + [line for line, _ in BAD_LINES])
    report = data.check_dataset(path, tiny_tokenizer, 64)
    reasons = [f"{e['where']}: {e['reason']}" for e in report["errors"]]
    for (_, expected), got in zip(BAD_LINES, reasons):
        number, rest = expected.split(": ", 1)
        assert got.startswith(f"line {int(number.split()[1]) + 2}: {rest}"), got
    assert len(reasons) == len(BAD_LINES) and report["trainable"] == 1 and not report["ok"]
    with pytest.raises(UserError, match=r"9 conversation\(s\) cannot be trained on(.|\n)*line 3: not JSON"):
        data.load_dataset(str(path), tiny_tokenizer, 64)


def test_json_array_file_and_builtin(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([json.loads(GOOD), {"messages": json.loads(GOOD)}]))
    assert data.check_dataset(path, tiny_tokenizer, 64)["trainable"] == 2
    report = data.check_dataset("builtin:tiny-reasoning", tiny_tokenizer, 4096)
    assert report["ok"] and report["conversations"] >= 40 and report["tokens"]["trained"] > 0


def test_over_long_samples_are_truncated_or_reported_dropped(tmp_path, tiny_tokenizer):
    long_prompt = '[{"role": "user", "content": "' + "word " * 200 + '"}, {"role": "assistant", "content": "ok"}]'
    long_answer = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "' + "word " * 200 + '"}]'
    path = write_lines(tmp_path / "d.jsonl", [long_prompt, long_answer])
    report = data.check_dataset(path, tiny_tokenizer, 32)
    assert [d["where"] for d in report["dropped"]] == ["line 1"]
    assert [t["where"] for t in report["truncated"]] == ["line 2"] and not report["ok"]
    kept = data.load_dataset(str(write_lines(tmp_path / "ok.jsonl", [long_answer])), tiny_tokenizer, 32)
    assert len(kept[0].input_ids) == 32 and kept[0].full_length > 32 and kept[0].trained_tokens > 0


def test_data_check_command(tmp_path, tiny_model):
    runner = CliRunner()
    good = write_lines(tmp_path / "good.jsonl", [GOOD])
    result = runner.invoke(data_command, ["check", str(good), "--model", str(tiny_model), "--max-length", "64"])
    assert result.exit_code == 0 and "OK" in result.output
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, BAD_LINES[2][0]])
    result = runner.invoke(data_command, ["check", str(bad), "--model", str(tiny_model), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["errors"][0]["where"] == "line 2" and "unknown role 'tool'" in report["errors"][0]["reason"]
    result = runner.invoke(data_command, ["check", "builtin:tiny-reasoning"])       # built-in tokenizer
    assert result.exit_code == 0, result.output
