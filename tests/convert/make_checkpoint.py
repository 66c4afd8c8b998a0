"""Write a real DeepSpeed ZeRO checkpoint of a tiny DeepSeek-V3 the way the SFT stage lays it out.

Run under torchrun (2 ranks, gloo, CPU).  The convert tests need checkpoints written by DeepSpeed itself,
not hand-made pickles, so this trains a few real steps and saves `<out>/<tag>/` + marker + `<out>/hf/`.

    torchrun --nproc_per_node 2 make_checkpoint.py --base BASE --out OUT [--stage 3] [--dtype bf16]
    python make_checkpoint.py --build-base BASE [--layers 3 --hidden 128 ...]   (one process, no DeepSpeed)
"""
import argparse
import json
import os
import shutil

from clusterctl.atomic import MARKER

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_config(vocab_size: int, layers: int = 3, hidden: int = 128, experts: int = 4):
    """RECIPES §3.4/§6: the tiny DeepSeek-V3 that both transformers and vLLM accept."""
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=experts, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
        max_position_embeddings=256, scoring_func="sigmoid", tie_word_embeddings=False,
    )
    cfg.topk_method = "noaux_tc"
    return cfg


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, converting checkpoints is fun"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def build_base(base: str, layers: int, hidden: int, experts: int) -> None:
    """A base model folder (config, tokenizer, fp32 weights) like a downloaded Hugging Face model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(len(tok), layers, hidden, experts), dtype=torch.float32)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    with open(os.path.join(base, "config.json")) as f:
        cfg = json.load(f)
    cfg["topk_method"] = "noaux_tc"            # transformers 5 drops it; vLLM needs it (RECIPES §3.4)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def train_and_save(base: str, out: str, stage: int, dtype: str, steps: int, tag: str, freeze: bool) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds_cfg = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 1e6, "stage3_prefetch_bucket_size": 1e6},
        "bf16": {"enabled": dtype == "bf16"},
    }
    keep = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # must stay alive during from_pretrained
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    del keep                                  # else write_layout's meta model would be built inside zero.Init
    if freeze:                                # frozen parameters are saved apart from the optimizer's
        model.get_input_embeddings().weight.requires_grad_(False)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)  # no fused_adam build
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=ds_cfg)
    torch.manual_seed(1 + dist.get_rank())
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 16))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag=tag)
    dist.barrier()
    if dist.get_rank() == 0:
        hf = os.path.join(out, "hf")
        os.makedirs(hf, exist_ok=True)
        for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
            if os.path.exists(os.path.join(base, name)):
                shutil.copy(os.path.join(base, name), hf)
        from clusterctl.convert.layout import write_layout

        write_layout(hf)
        with open(os.path.join(out, tag, MARKER), "w") as f:
            json.dump({"tag": tag, "step": steps}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--build-base")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--base")
    p.add_argument("--out")
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tag", default="global_step2")
    p.add_argument("--freeze-embeddings", action="store_true")
    a = p.parse_args()
    if a.build_base:
        build_base(a.build_base, a.layers, a.hidden, a.experts)
    else:
        train_and_save(a.base, a.out, a.stage, a.dtype, a.steps, a.tag, a.freeze_embeddings)


if __name__ == "__main__":
    main()
