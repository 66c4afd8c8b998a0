"""The tiny model: shaped for DeepSpeed and vLLM's CPU backend, deterministic, written atomically."""
import hashlib
import json

from safetensors import safe_open

from clusterctl.training import tiny
from clusterctl.training.checkpoint import MARKER


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != MARKER}


def test_config_carries_what_vllm_needs(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"
    assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576          # the CPU MLA kernel's only size
    assert (cfg["n_routed_experts"], cfg["n_shared_experts"], cfg["first_k_dense_replace"]) == (4, 1, 1)
    assert cfg["n_routed_experts"] % cfg["n_group"] == 0
    assert (tiny_model / MARKER).is_file() and (tiny_model / "generation_config.json").is_file()


def test_weights_dtypes(tiny_model):
    with safe_open(tiny_model / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in dtypes       # per-expert names vLLM loads


def test_tokenizer_has_deepseek_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.eos_token == "<｜end▁of▁sentence｜>"
    for marker in (tiny.USER, tiny.ASSISTANT, tiny.THINK, tiny.END_THINK):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, marker
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    prompt = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                      {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"},
                                      {"role": "user", "content": "Q2"}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{tok.bos_token}S{tiny.USER}Q{tiny.ASSISTANT}\n\nA{tok.eos_token}{tiny.USER}Q2{tiny.ASSISTANT}"


def test_deterministic_idempotent_and_atomic(tiny_model, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "again")
    assert digest(again) == digest(tiny_model)
    stamp = (again / MARKER).stat().st_mtime_ns
    assert tiny.build_tiny_model(again) == again and (again / MARKER).stat().st_mtime_ns == stamp   # reused
    leftover = tmp_path / "leftover"          # an interrupted build: files but no marker
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    tiny.build_tiny_model(leftover)
    assert digest(leftover) == digest(tiny_model)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
