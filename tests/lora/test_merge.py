"""The streaming merge of a LoRA SFT checkpoint (tiny DeepSeek-V3, every target group, fused routed experts):
same names and tensors as peft's merge_and_unload, logits of base + adapter, and the per-expert adapter."""
import json
import subprocess
import sys

import pytest
from sft_run import run_sft, write_config

from clusterctl.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("lora")
    run_sft(write_config(work / "sft", model=str(tiny_model), grad_accum=1, max_steps=2, save_steps=2,
                         offload_param=True,        # the frozen base in host RAM, as for 671B on 3 nodes
                         method="lora", lora={"rank": 4, "alpha": 8, "targets": ["all"]}))
    return work / "sft" / "checkpoints"


def tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_merge_equals_peft_merge_and_unload_and_writes_a_per_expert_adapter(lora_run, tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clusterctl.convert.merge import lora_checkpoint
    from clusterctl.training.lora import exact_targets

    subprocess.run([sys.executable, "-m", "clusterctl.convert", "--checkpoint", str(lora_run), "--out",
                    str(tmp_path / "model")], check=True, timeout=600)      # the convert stage's command
    marker = json.loads((tmp_path / "model" / "clusterctl-complete.json").read_text())
    assert marker["verify"]["logits"] == "match" and marker["verify"]["bytes"] == "equal"
    assert marker["source"] == str(tiny_model) and marker["merged"] == 48
    _, _, adapter = lora_checkpoint(str(lora_run))

    with exact_targets():      # peft's own merge, in fp32, rounded once to the base dtype like ours
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                               adapter)
    peft_model.merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs, base = tensors(tmp_path / "model"), tensors(tmp_path / "peft"), tensors(tiny_model)
    assert set(ours) == set(theirs) == set(base)                            # the standard per-expert names
    changed = {n for n in ours if not torch.equal(ours[n], base[n])}
    assert "model.layers.0.mlp.gate_proj.weight" in changed                  # dense MLP
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in changed   # shared experts
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in changed          # one routed expert of a fused pair
    assert not any("norm" in n or "embed" in n or "lm_head" in n or ".mlp.gate." in n for n in changed)
    for name, tensor in ours.items():
        want = theirs[name].to(tensor.dtype)
        ulp = 2.0 ** (torch.log2(want.float().abs().clamp(min=1e-30)).floor() - 7)   # one bf16 unit
        assert ((tensor.float() - want.float()).abs() <= ulp).all(), name

    per_expert = tensors(tmp_path / "model-adapter")
    config = json.loads((tmp_path / "model-adapter" / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.experts.2.gate_proj" in config["target_modules"] and not config["target_parameters"]
    scaling = config["lora_alpha"] / config["r"]
    for module in config["target_modules"]:                                 # each factor pair is its merged delta
        a = per_expert[f"base_model.model.{module}.lora_A.weight"]
        b = per_expert[f"base_model.model.{module}.lora_B.weight"]
        rebuilt = (base[f"{module}.weight"].float() + scaling * (b @ a)).to(torch.bfloat16)
        assert torch.equal(rebuilt, ours[f"{module}.weight"]), module
    assert len(config["target_modules"]) == 24 + 2 * 4 * 3                  # 4 experts x gate/up/down, 2 layers


def test_merge_refuses_to_overwrite_a_complete_folder_and_a_wrong_adapter(lora_run, tiny_model, tmp_path):
    from clusterctl.convert.merge import lora_checkpoint, merge

    _, hf, adapter = lora_checkpoint(str(lora_run))
    merge(str(tiny_model), adapter, str(tmp_path / "model"), hf_dir=hf, verify=False)
    with pytest.raises(UserError, match="already a complete model folder"):
        merge(str(tiny_model), adapter, str(tmp_path / "model"), hf_dir=hf, verify=False)
    with pytest.raises(UserError, match="not a clusterctl LoRA adapter folder"):
        merge(str(tiny_model), str(tmp_path / "model"), str(tmp_path / "other"), hf_dir=hf)
