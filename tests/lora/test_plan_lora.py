"""The planner under LoRA / QLoRA: LoRA parameter counts equal peft's, and DeepSeek-V3 671B LoRA fits on
Colossal-AI's 3 nodes x 8 x 80 GiB (where full SFT does not), with the host RAM it needs."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.commands.plan import command as plan_command
from clusterctl.errors import UserError
from clusterctl.plan import GIB, ModelShape, Setup, load_shape, plan, suggest

V3 = str(Path(__file__).parents[1] / "data" / "models" / "deepseek-v3")   # the real 671B config.json


def test_lora_parameter_count_equals_peft_on_moe_and_dense_models(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from clusterctl.training.lora import LoraSettings, apply_lora

    def peft_count(model, rank):
        peft_model, _, _ = apply_lora(model, LoraSettings(rank=rank, alpha=2 * rank, targets=["all"]))
        return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    moe = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert load_shape(str(tiny_model)).lora_params(4)[0] == peft_count(moe, 4)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    assert ModelShape.from_config(cfg.to_dict()).lora_params(8)[0] == peft_count(LlamaForCausalLM(cfg), 8)


def test_671b_lora_fits_three_nodes_with_parameter_offload_where_full_sft_does_not():
    v3 = load_shape(V3)
    setup = Setup(nodes=3, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=2048, method="lora",
                  expert_groups=1)                          # fused experts: 21 GiB gathered per layer
    alone = plan(v3, setup)
    assert not alone.fits_gpu and alone.trained == pytest.approx(2.5e9, rel=0.01)
    text, fitting = suggest(v3, setup)
    assert "--offload-param" in text and fitting.fits and fitting.setup.nodes == 3
    assert 400 * GIB < fitting.host_total < 600 * GIB                        # the frozen base's partitions
    full = plan(v3, Setup(nodes=3, gpus_per_node=8, gpu_memory_gib=80, host_memory_gib=2048,
                          offload_optimizer=True, offload_param=True))
    assert not full.fits                                                    # 16 bytes per parameter on the host
    full_states = plan(v3, Setup(nodes=3, gpus_per_node=8)).gpu["grads+optimizer"]
    assert fitting.gpu["grads+optimizer"] == 0 and alone.gpu["grads+optimizer"] < full_states / 100


def test_a_frozen_base_keeps_a_whole_layer_gathered_in_the_recomputed_backward():
    """Groups bound full SFT's gathered experts; a frozen base's recomputed layer stays gathered whole, and without
    checkpointing the fused or frozen experts' saved views keep every MoE layer's experts gathered."""
    v3 = load_shape(V3)
    setup = Setup(nodes=3, gpus_per_node=8, offload_optimizer=True, offload_param=True)
    full, lora = plan(v3, setup), plan(v3, Setup(**{**setup.__dict__, "method": "lora"}))
    assert full.gpu["gathered params"] < 2 * GIB                    # 16 groups of 0.7 B, or the embedding
    assert lora.gpu["gathered params"] == 2 * v3.layer_params() > 20 * GIB
    without = {**setup.__dict__, "gradient_checkpointing": False}     # the experts' saved views: every MoE layer's
    every_moe_layer = 2 * v3.moe_layers() * v3.experts_params()
    assert plan(v3, Setup(**{**without, "method": "lora"})).gpu["gathered params"] == min(every_moe_layer, 2 * v3.params())
    assert plan(v3, Setup(**{**without, "expert_groups": 1})).gpu["gathered params"] == every_moe_layer
    assert plan(v3, Setup(**without)).gpu["gathered params"] == full.gpu["gathered params"]     # groups save none


def test_cli_prints_the_trained_share_and_qlora_needs_zero2():
    result = CliRunner().invoke(plan_command, ["--model", V3, "--method", "lora", "--nodes", "3", "--offload",
                                               "--offload-param"])
    assert result.exit_code == 0, result.output
    assert "lora: rank 8 on every target group, 2495.9 M trained parameters (0.37 %)" in result.output
    assert "GiB of 2048 GiB: fits" in result.output
    with pytest.raises(UserError, match="QLoRA keeps the whole 4-bit base"):
        plan(load_shape(V3), Setup(method="qlora"))
    dense = ModelShape.from_config({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                                    "num_hidden_layers": 32, "num_attention_heads": 32})
    qlora = plan(dense, Setup(nodes=1, gpus_per_node=1, zero=2, method="qlora", gpu_memory_gib=24))
    assert qlora.gpu["params"] < 0.3 * 2 * dense.params() and qlora.fits    # a 7B in 4 bits on one 24 GiB GPU
