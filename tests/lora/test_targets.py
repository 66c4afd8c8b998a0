"""Target groups resolve to exactly the intended weights of the tiny DeepSeek-V3, and peft adapts exactly
those (its deepseek_v3 rewrite of gate/up/down_proj switched off)."""
import pytest

from clusterctl.errors import ConfigError
from clusterctl.training.lora import LoraSettings, apply_lora, resolve_targets


@pytest.fixture(scope="module")
def model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)


ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def test_each_group_selects_its_own_weights(model):
    attention, none = resolve_targets(model, ["attention"])
    assert attention == [f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ATTENTION] and none == []
    assert resolve_targets(model, ["dense_mlp"]) == ([f"model.layers.0.mlp.{n}" for n in MLP], [])
    assert resolve_targets(model, ["shared_experts"]) == (
        [f"model.layers.{i}.mlp.shared_experts.{n}" for i in (1, 2) for n in MLP], [])
    assert resolve_targets(model, ["routed_experts"]) == (
        [], [f"model.layers.{i}.mlp.experts.{n}" for i in (1, 2) for n in ("gate_up_proj", "down_proj")])
    modules, params = resolve_targets(model, ["all"])
    assert len(modules) == 15 + 3 + 6 and len(params) == 4
    assert not any("lm_head" in n or n.endswith("mlp.gate") for n in modules)


def test_explicit_names_match_by_dotted_suffix(model):
    assert resolve_targets(model, ["kv_b_proj", "layers.0.mlp.up_proj"]) == (
        ["model.layers.0.self_attn.kv_b_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.kv_b_proj",
         "model.layers.2.self_attn.kv_b_proj"], [])
    with pytest.raises(ConfigError, match="'w13' matches no linear layer"):
        resolve_targets(model, ["w13"])


def test_apply_lora_adapts_exactly_the_resolved_names(tiny_model):
    """peft left alone would move gate/up/down_proj onto the routed experts at twice the rank."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model, modules, params = apply_lora(base, LoraSettings(rank=4, alpha=8, targets=["dense_mlp",
                                                                                          "shared_experts"]))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = {f"base_model.model.{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}
    assert trained == expected and params == []
    assert peft_model.base_model.model.model.layers[0].mlp.gate_proj.lora_A["default"].weight.shape == (4, 128)
    assert not hasattr(peft_model.base_model.model.model.layers[1].mlp.experts, "lora_A")
