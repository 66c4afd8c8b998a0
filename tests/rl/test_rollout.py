"""Rollouts from a real vLLM CPU server that reloads weights from disk: after POST /collective_rpc
reload_weights, its greedy tokens equal transformers' on the saved weights (and differ from before).

On a tiny Llama (head size 64): vLLM 0.32's CPU build fails to reload MLA attention (DeepSeek-V3) in
place ("size of tensor a (0) must match ... 512" in the MLA weight post-processing)."""
from __future__ import annotations

import pytest
import torch

from clusterctl.deploy.vllm_args import CPU_SERVE_FLAGS
from clusterctl.training.rl.rollout import VllmServer, save_weights, serve_command

pytestmark = pytest.mark.slow
PROMPTS = ["What is 2 + 3?", "Using the numbers [3, 5, 7], create an equation"]


def greedy(model, tokenizer, prompt: str, tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clusterctl.training.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("llama") / "model"
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_server_reloads_weights_and_matches_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model = tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    with torch.no_grad():                      # a "training step": every weight moves
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.05)
    save_weights(model, tmp_path / "step-1")
    port = 18000 + (hash(str(tmp_path)) % 1000)
    assert serve_command(tiny_model, port, 256)[1:] == [
        "serve", str(tiny_model), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "policy",
        "--logprobs-mode", "processed_logprobs", "--max-model-len", "256", *CPU_SERVE_FLAGS, "--disable-log-stats"]
    server = VllmServer(tiny_model, port, 256, tmp_path / "logs", timeout=600)
    try:
        ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        before = [c["token_ids"] for c in server.complete(ids, max_tokens=8, temperature=0.0, top_p=1.0)]
        seconds = server.reload(tmp_path / "step-1")
        choices = server.complete(ids, max_tokens=8, temperature=0.0, top_p=1.0)
    finally:
        server.stop()
    after = [c["token_ids"] for c in choices]
    model.config.use_cache = True
    expected = [greedy(model, tokenizer, p, 8) for p in PROMPTS]
    assert after == expected
    assert before != after, "the reload changed nothing"
    assert all(len(c["logprobs"]["token_logprobs"]) == 8 for c in choices)
    assert all(lp <= 0 for c in choices for lp in c["logprobs"]["token_logprobs"])
    assert seconds < 30


def test_grpo_samples_from_the_reloading_server(tiny_llama, tmp_path):
    """GRPO with rollout.engine vllm-server on 2 ranks of one node: one server for the node (a second on
    the same port would take half the requests and never be reloaded), synced after every step (reload
    time and rollout tokens/s in metrics.jsonl), and it does not outlive the run."""
    from rl_run import read_metrics, run, toy_grpo

    from clusterctl.procs import processes_with_env

    config = toy_grpo(tmp_path / "job", model=str(tiny_llama), max_steps=3, save_steps=3, max_length=64,
                      grpo={"rollout": {"engine": "vllm-server", "port": 18000 + (hash(str(tmp_path)) % 1000)}})
    run("grpo", config, nproc=2, env={"LOG_DIR": str(tmp_path / "logs"), "CLUSTERCTL_RL_TEST": str(tmp_path)})
    metrics = read_metrics(tmp_path / "job" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["rollout/tokens_per_s"] > 0 for m in metrics)
    assert all(0 < m["rollout/reload_s"] < 30 for m in metrics[1:])     # synced after steps 1 and 2
    assert (tmp_path / "logs" / "rollout-vllm-0.log").read_text().count("Started server process") == 1
    assert processes_with_env(f"CLUSTERCTL_RL_TEST={tmp_path}") == []
