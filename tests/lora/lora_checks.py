"""What a LoRA SFT of the tiny DeepSeek-V3 with `targets: [all]` must have trained, saved and merged: shared by
the 2-rank, 2-local-node and Slurm tests (every backend trains the same modules and changes nothing else)."""
import json
import re
from pathlib import Path

from clusterctl.training import checkpoint as ckpt
from clusterctl.training.lora import TARGETS_FILE

# one of each target group of the tiny model: dense MLP (layer 0), shared experts, attention (MLA)
GROUP_MODULES = {"model.layers.0.mlp.down_proj", "model.layers.2.mlp.shared_experts.up_proj",
                 "model.layers.1.self_attn.kv_b_proj"}
ROUTED_EXPERTS = "model.layers.2.mlp.experts.gate_up_proj"   # the fused 3-D routed experts (peft target_parameters)


def assert_all_groups_targeted(checkpoints: Path, rank: int) -> dict:
    """<output_dir>/lora.json lists every group of `targets: all`; returns it."""
    described = json.loads((checkpoints / TARGETS_FILE).read_text())
    assert described["rank"] == rank and len(described["modules"]) == 24 and len(described["parameters"]) == 4
    assert GROUP_MODULES <= set(described["modules"]), described["modules"]
    assert ROUTED_EXPERTS in described["parameters"], described["parameters"]
    return described


def assert_checkpoint_holds_only_adapters(tag: Path, described: dict, base_model: Path) -> None:
    """The DeepSpeed checkpoint trained every adapted module's LoRA factors and nothing else (adapter-sized, no
    base partitions); the saved peft adapter moved every lora_B away from its zero start."""
    import torch
    from safetensors.torch import load_file

    saved = torch.load(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    lora_names = {f"base_model.model.{m}.lora_{ab}.default.weight" for m in described["modules"] for ab in "AB"}
    assert set(saved["param_shapes"][0]) >= lora_names                       # every adapted module trained ...
    assert all(".lora_A." in n or ".lora_B." in n for n in saved["param_shapes"][0])  # ... and nothing else
    assert len(saved["param_shapes"][0]) == len(lora_names) + 2 * len(described["parameters"])
    size = sum(f.stat().st_size for f in tag.glob("*.pt"))
    base_size = sum(f.stat().st_size for f in base_model.glob("*.safetensors"))
    assert size < base_size / 2, (size, base_size)                            # adapter-sized, no base partitions

    adapter = load_file(tag / "adapter" / "adapter_model.safetensors")
    untrained = [n for n, t in adapter.items() if ".lora_B." in n and not t.abs().max() > 0]
    assert not untrained, untrained                                           # lora_B starts at zero: all moved
    assert {n.replace("base_model.model.", "").rsplit(".lora_", 1)[0] for n in adapter} >= set(described["modules"])
    assert json.loads((tag / ckpt.MARKER).read_text())["method"] == "lora"


def adapted(name: str, described: dict) -> bool:
    """Whether a per-expert Hugging Face tensor belongs to an adapted module or fused expert parameter."""
    module = name.removesuffix(".weight")
    fused = re.sub(r"experts\.\d+\.(gate|up)_proj$", "experts.gate_up_proj", module)
    fused = re.sub(r"experts\.\d+\.down_proj$", "experts.down_proj", fused)
    return module in described["modules"] or fused in described["parameters"]


def assert_merge_changed_only_adapted(merged: Path, described: dict) -> None:
    """The merged folder differs from its base (the marker's source) only in adapted tensors, every other tensor
    bit for bit the base's, and in each group (dense MLP, shared and routed experts, attention). Not necessarily in
    every adapted tensor: a tiny delta (a low learning rate, 2 steps) can round away in bf16."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    base = Path(json.loads((merged / ckpt.MARKER).read_text())["source"])
    before, after = tensors(base), tensors(merged)
    assert set(before) == set(after)
    changed = {name for name in after if not torch.equal(before[name], after[name])}
    expected = {name for name in after if adapted(name, described)}
    assert changed <= expected, sorted(changed - expected)[:8]
    for group in (r"layers\.0\.mlp\.", r"\.shared_experts\.", r"\.experts\.\d+\.", r"\.self_attn\."):
        assert any(re.search(group, name) for name in changed), (group, sorted(changed)[:8])
