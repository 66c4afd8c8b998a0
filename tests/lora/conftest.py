"""LoRA tests reuse the SFT tests' launch helpers (tests/training/sft_run.py) and tiny-model fixtures."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))   # sft_run: a sibling test folder
from fixtures.runs import wait_for  # noqa: E402, F401  (polls `clusterctl status`; the Slurm test uses it)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from clusterctl.training.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A dense Llama (head size 32, which vLLM's CPU build serves) with the tiny model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clusterctl.training.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("llama") / "model"
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
