"""A tiny DeepSeek-V3 (about 1.4 M parameters) with a DeepSeek-style tokenizer, built offline in seconds.

It is what local runs and the tests train, convert and serve, so its shape satisfies both stacks
(shared/RECIPES.md §3.4, §6): MLA with kv_lora_rank 512 + qk_rope_head_dim 64 (the only latent size the
vLLM CPU MLA kernel supports), `topk_method: noaux_tc` written into config.json (transformers 5 drops it;
vLLM needs it), MoE with 1 shared + 4 routed experts, one dense-first layer. Weights are random but
deterministic for a seed; `e_score_correction_bias` stays fp32 (saved through `from_pretrained`).

    python -m clusterctl.training.tiny OUT_DIR [--seed N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from clusterctl.training.checkpoint import MARKER, is_complete, write_marker

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
VOCAB_SIZE = 1024

# DeepSeek-R1's inference template without the tool-call branches: system prompts first, BOS once,
# earlier answers keep only the text after </think>, generation prompt `<｜Assistant｜>`.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '" + ASSISTANT + "' + content + '" + EOS + "' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

MODEL_SHAPE = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
    q_lora_rank=64, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
    max_position_embeddings=4096, routed_scaling_factor=2.5, norm_topk_prob=True,
    tie_word_embeddings=False, initializer_range=0.02,
)


def _corpus() -> list[str]:
    """Text the BPE merges are learned from: the shipped conversations (fixed, so merges are too)."""
    texts = []
    path = Path(__file__).with_name("data") / "tiny_reasoning.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        conv = json.loads(line)
        for message in conv["messages"] if isinstance(conv, dict) else conv:
            texts.append(message["content"])
            texts.append(message.get("reasoning_content", ""))
    return texts


def build_tokenizer():
    """A ByteLevel BPE (any text encodes) with DeepSeek's special tokens and a DeepSeek-style template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Like DeepSeek's: BOS/EOS are special (skipped on decode); role and think markers are plain added tokens.
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in (BOS, EOS)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in (USER, ASSISTANT, THINK, END_THINK)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   chat_template=CHAT_TEMPLATE, model_max_length=MODEL_SHAPE["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)


def _seal_tree(root: Path) -> None:
    """Make every file world-readable (a shared model folder) and durable before the marker."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            path.chmod(0o644)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, shape: dict | None = None) -> Path:
    """Write the tiny model folder at out_dir (tmp dir + rename, marker last); reuse a complete one.
    `shape` overrides MODEL_SHAPE keys (benchmarks build larger models of the same family)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig

    out = Path(out_dir)
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = build_tokenizer()
        config = DeepseekV3Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **{**MODEL_SHAPE, **(shape or {})})
        torch.manual_seed(seed)
        DeepseekV3ForCausalLM(config).save_pretrained(tmp / "fp32")
        # Reload through from_pretrained: it keeps e_score_correction_bias fp32 while the rest goes bf16.
        model = DeepseekV3ForCausalLM.from_pretrained(tmp / "fp32", dtype=torch.bfloat16)
        shutil.rmtree(tmp / "fp32")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         do_sample=True, temperature=0.6, top_p=0.95).save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.update(topk_method="noaux_tc", scoring_func="sigmoid")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        _seal_tree(tmp)
        write_marker(tmp, {"kind": "tiny-deepseek-v3", "seed": seed,
                           "parameters": sum(p.numel() for p in model.parameters())})
        if out.exists():  # an incomplete leftover of an interrupted build
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"tiny DeepSeek-V3 ready: {out} ({MARKER} present)")


if __name__ == "__main__":
    main()
