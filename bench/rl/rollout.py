"""GRPO rollouts on CPU: tokens/s from the reloading vLLM server (rollout.engine vllm-server) against
transformers `generate` in the trainer (engine transformers), and the weight sync time (save from the
trainer + POST /collective_rpc reload_weights) at two model sizes. Tiny Llama models (head size 64,
which vLLM's CPU build serves), random weights, sampling at temperature 1, one process each.

    .venv/bin/python bench/rl/rollout.py [--prompts 16] [--tokens 32]
"""
from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
         "medium": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8)}


def build(folder: Path, shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clusterctl.training.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
                         num_key_value_heads=shape["num_attention_heads"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def transformers_tokens_per_s(model, tokenizer, prompts: list[str], tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    generate = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0)
    model.generate(**batch, **generate)                                   # warm-up
    started = time.perf_counter()
    out = model.generate(**batch, **generate)
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - started)


def measure(prompt_count: int, tokens: int) -> list[tuple]:
    """(size name, parameters, transformers tok/s, vLLM server tok/s, save s, reload s) per model size."""
    from clusterctl.training.rl.rollout import VllmServer, save_weights

    prompts = [f"Question {i}: using the numbers [3, 5, 7], make 22." for i in range(prompt_count)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SIZES.items():
            folder = Path(tmp) / name
            model, tokenizer = build(folder, shape)
            params = sum(p.numel() for p in model.parameters())
            hf = transformers_tokens_per_s(model, tokenizer, prompts, tokens)
            ids = [tokenizer(p)["input_ids"] for p in prompts]
            server = VllmServer(folder, free_port(), 256, Path(tmp) / "logs", timeout=900)
            try:
                server.complete(ids, max_tokens=tokens, temperature=1.0, top_p=1.0)    # warm-up
                started = time.perf_counter()
                choices = server.complete(ids, max_tokens=tokens, temperature=1.0, top_p=1.0)
                vllm = sum(len(c["token_ids"]) for c in choices) / (time.perf_counter() - started)
                started = time.perf_counter()
                save_weights(model, Path(tmp) / f"{name}-step")
                save = time.perf_counter() - started
                reloads = [server.reload(Path(tmp) / f"{name}-step") for _ in range(3)]
            finally:
                server.stop()
            rows.append((name, params, hf, vllm, save, min(reloads)))
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    rows = measure(args.prompts, args.tokens)
    print(f"rollout of {args.prompts} prompts x {args.tokens} tokens, bf16, CPU (torch threads {torch.get_num_threads()})")
    print(f"{'model':<8} {'params':>10} {'transformers tok/s':>19} {'vLLM server tok/s':>18} {'ratio':>6} "
          f"{'save s':>7} {'reload s':>9}")
    for name, params, hf, vllm, save, reload in rows:
        print(f"{name:<8} {params:>10,} {hf:>19.0f} {vllm:>18.0f} {vllm / hf:>5.1f}x {save:>7.3f} {reload:>9.3f}")


if __name__ == "__main__":
    main()
