"""The memory planner: parameter counts from config.json, fit verdicts, suggestions, the CLI."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.commands.plan import command as plan_command
from clusterctl.errors import UserError
from clusterctl.plan import GIB, ModelShape, Setup, load_shape, plan, suggest

V3 = str(Path(__file__).parents[1] / "data" / "models" / "deepseek-v3")   # the real 671B config.json


def test_parameter_counts_match_real_models(tiny_model):
    v3 = load_shape(V3)
    assert v3.params() == pytest.approx(671.0e9, rel=1e-3)                # DeepSeek-V3's published 671 B
    assert v3.largest_module_params(1) == 256 * 3 * 7168 * 2048             # one layer's fused experts
    assert v3.expert_groups() == 16                                         # the trainer's default groups
    assert v3.largest_module_params() == 129_280 * 7168                     # then the embedding is largest
    built = json.loads((tiny_model / "clusterctl-complete.json").read_text())["parameters"]
    assert load_shape(str(tiny_model)).params() == built                    # exact against the real module tree


def test_recipe_micro_batch_2_fits_with_grouped_experts_only():
    """The published recipe's setting (micro-batch 2, sp 4, full offload, 32k): the fused experts' gather
    and gradient (21 GiB each) do not fit 80 GiB; the trainer's default groups (16 of 16 experts) do."""
    recipe = Setup(nodes=32, gpus_per_node=8, sp=4, zero=3, offload_optimizer=True, offload_param=True,
                   micro_batch=2, seq_len=32768)
    v3 = load_shape(V3)
    fused, grouped = plan(v3, replace(recipe, expert_groups=1)), plan(v3, recipe)
    assert not fused.fits_gpu and fused.gpu["gathered params"] == 2 * 256 * 3 * 7168 * 2048
    assert grouped.fits_gpu and grouped.gpu_total < 50 * GIB
    assert grouped.gpu["gathered params"] == 2 * 1e9                        # stage3_max_live_parameters
    assert grouped.gpu["module grad"] == 2 * 129_280 * 7168                 # a group (0.70 B) < the embedding
    assert plan(v3, replace(recipe, expert_groups=16)).gpu == grouped.gpu


def test_dense_model_count_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    real = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert ModelShape.from_config(cfg.to_dict()).params() == real


def test_reference_recipe_fits_only_with_offload_and_the_suggestion_fits():
    v3 = load_shape(V3)
    recipe = Setup(nodes=32, gpus_per_node=8, sp=4, zero=3, offload_optimizer=True, offload_param=True,
                   micro_batch=1, seq_len=32768)
    assert plan(v3, recipe).fits
    no_offload = Setup(nodes=32, gpus_per_node=8, sp=4, zero=3, micro_batch=1, seq_len=32768)
    result = plan(v3, no_offload)
    assert not result.fits_gpu and result.gpu["grads+optimizer"] == 16 * result.params / 256
    change, better = suggest(v3, no_offload)
    assert "offload" in change and better.fits
    more = plan(v3, Setup(nodes=32, gpus_per_node=8, sp=8, zero=3, offload_optimizer=True, offload_param=True,
                          micro_batch=1, seq_len=32768))
    assert more.gpu["activations"] < plan(v3, recipe).gpu["activations"]   # SP divides activations


def test_invalid_setups_are_named():
    v3 = load_shape(V3)
    with pytest.raises(UserError, match="--sp"):
        plan(v3, Setup(nodes=1, gpus_per_node=8, sp=3))
    with pytest.raises(UserError, match="parameter offload needs ZeRO stage 3"):
        plan(v3, Setup(zero=2, offload_param=True))


def test_plan_command(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(plan_command, ["--model", V3, "--nodes", "32", "--sp", "4", "--offload", "--offload-param",
                                      "--seq-len", "32768", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert report["fits"] and report["gpu_total_gib"] < 80 and report["suggestion"] is None
    bad = runner.invoke(plan_command, ["--model", V3, "--nodes", "4", "--seq-len", "32768"])
    assert bad.exit_code == 1 and "DOES NOT FIT" in bad.output and "suggestion:" in bad.output
    missing = runner.invoke(plan_command, ["--model", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "config.json" in str(missing.exception or missing.output)


def test_tiny_gib_scale():
    result = plan(load_shape("builtin:tiny-deepseek-v3"), Setup(gpus_per_node=2, micro_batch=2, seq_len=256,
                                                                runtime_gib=0))
    assert result.fits and result.gpu_total < 1 * GIB


@pytest.mark.parametrize("option", ["--gpu-memory", "--host-memory"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-80"])
def test_memory_sizes_must_be_finite_and_positive(option, value):
    result = CliRunner().invoke(plan_command, [option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert "not a number of GiB above 0" in result.output
