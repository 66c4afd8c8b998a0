"""A newcomer's first run: README command 1's `submit sft --nodes 2` (the embedded default) trains the tiny
model until it answers the shipped data set's question as taught, and ends by asking the endpoint that
question, the taught answer printed beside the reply."""
import json

import pytest
from fixtures.ports import free_port

from clusterctl.health import DEFAULT_PROMPT
from clusterctl.sample import TAUGHT_PROMPT, SampleQuestion, sample_question, shipped_data, taught, verdict
from clusterctl.training.config import BUILTIN_DATA_FILES, BUILTIN_FIRST_RUN_DATA
from clusterctl.training.data import resolve_data_path


def test_the_first_run_set_is_part_of_the_shipped_set_and_holds_the_taught_question():
    full = shipped_data().read_text(encoding="utf-8").splitlines()
    first = shipped_data(BUILTIN_DATA_FILES[BUILTIN_FIRST_RUN_DATA]).read_text(encoding="utf-8").splitlines()
    assert len(first) == 4 and set(first) <= set(full)
    assert resolve_data_path(BUILTIN_FIRST_RUN_DATA).read_text(encoding="utf-8").splitlines() == first
    question = taught(resolve_data_path(BUILTIN_FIRST_RUN_DATA), TAUGHT_PROMPT)
    assert question is not None and question.expected and question.where == "line 1 of tiny_first_run.jsonl"
    assert question.expected == taught(shipped_data(), TAUGHT_PROMPT).expected


def test_the_question_follows_the_data_the_run_trained_on(tmp_path):
    (tmp_path / "job.yaml").write_text(f"data: {BUILTIN_FIRST_RUN_DATA}\n")
    assert sample_question(tmp_path).prompt == TAUGHT_PROMPT
    (tmp_path / "job.yaml").write_text("data: /data/mine.jsonl\n")
    assert sample_question(tmp_path) == SampleQuestion(DEFAULT_PROMPT)
    assert verdict(SampleQuestion(DEFAULT_PROMPT), "Hello.") == []


def greedy_answer(model_dir: str, prompt: str) -> str:
    """The converted model's own greedy reply (transformers), the part after </think>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("</think>")[-1].strip()


@pytest.mark.slow
def test_embedded_default_learns_the_taught_answer_and_submit_asks_it(clusterctl, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"backend: local\nports: {{vllm: {free_port()}}}\n")
    submitted = clusterctl("submit", "sft", "--nodes", "2", "--cluster", cluster, "--json", check=False,
                           timeout=1200)
    run = json.loads(submitted.stdout or "{}").get("run")
    try:
        assert submitted.returncode == 0, submitted.stderr
        expected = taught(shipped_data(), TAUGHT_PROMPT).expected
        assert f"asked:  {TAUGHT_PROMPT!r}  (line 1 of tiny_first_run.jsonl, greedy decoding)" in submitted.stderr
        assert f"answer: {expected!r}" in submitted.stderr
        assert f"taught: {expected!r}  -> the reply is the trained answer" in submitted.stderr
        stages = json.loads(clusterctl("status", run, "--json").stdout)["stages"]
        assert greedy_answer(stages["convert"]["output"], TAUGHT_PROMPT) == expected
    finally:
        if run:
            clusterctl("cancel", run, check=False)
