"""LoRA on the SFT stage: which weights get adapters, and building them with peft.

Targets are named groups or explicit module/parameter names, resolved against the model into full
names before peft sees them, so what trains is exactly what `resolve_targets` printed (written to
`<output_dir>/lora.json`, which convert reads to merge). Groups:

- attention       nn.Linear inside `self_attn` (MLA's q_a/q_b/kv_a/kv_b/o_proj, or q/k/v/o_proj)
- dense_mlp       nn.Linear of a dense `mlp` (gate/up/down_proj; not the experts)
- shared_experts  nn.Linear inside `mlp.shared_experts`
- routed_experts  the fused 3-D expert parameters (`mlp.experts.gate_up_proj`, `down_proj`), trained by
                  peft's `target_parameters` (per-expert LoRA), or per-expert nn.Linear where a model has them
- all             every group above

peft 0.21 rewrites gate/up/down_proj targets of some MoE models (deepseek_v3 among them) into routed-expert
parameters with doubled rank and alpha, which would leave the dense MLP and the shared experts without LoRA:
`exact_targets()` switches that rewrite off while an adapter is built or loaded. No torch at module level
(training/config.py, which the orchestrator imports, uses `LoraSettings`).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import ConfigError

METHODS = ("full", "lora", "qlora")
GROUPS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
ALL = "all"
TARGETS_FILE = "lora.json"          # in the SFT output_dir: the resolved targets and settings
MERGE_MAP = "clusterctl-lora.json"  # beside each saved adapter: adapted weight -> adapter keys, scaling


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [ALL])   # groups, or module/parameter names

    def validate(self, at) -> None:
        if self.rank < 1:
            raise ConfigError("must be at least 1", where=at("rank"))
        if self.alpha <= 0:
            raise ConfigError("must be positive", where=at("alpha"))
        if not 0 <= self.dropout < 1:
            raise ConfigError("must be in [0, 1)", where=at("dropout"))
        if not self.targets:
            raise ConfigError("names nothing to train", where=at("targets"),
                              fix=f"use groups ({', '.join(GROUPS + (ALL,))}) or module names")


def group_of(name: str) -> str | None:
    """The target group of a linear module or a 3-D parameter, from its full name."""
    parts = name.split(".")
    if "self_attn" in parts:
        return "attention"
    if "mlp" not in parts:
        return None
    below = parts[parts.index("mlp") + 1:]
    if below[:1] == ["shared_experts"]:
        return "shared_experts"
    if below[:1] == ["experts"]:
        return "routed_experts"
    if len(below) == 1 and below[0] != "gate":          # mlp.gate is the MoE router: never adapted
        return "dense_mlp"
    return None


def candidates(model) -> tuple[list[str], list[str]]:
    """(nn.Linear module names, 3-D parameter names) that LoRA can adapt, lm_head and router excluded.
    Shapes come from ds_shape under ZeRO-3 (a partitioned parameter is empty on each rank)."""
    import torch

    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and group_of(n)]
    params = [n for n, p in model.named_parameters() if len(getattr(p, "ds_shape", p.shape)) == 3 and group_of(n)]
    return modules, params


def resolve_targets(model, targets: list[str]) -> tuple[list[str], list[str]]:
    """Full module names and full 3-D parameter names to adapt; an entry that matches nothing is an error."""
    modules, params = candidates(model)
    chosen_m, chosen_p = set(), set()
    for target in targets:
        groups = GROUPS if target == ALL else (target,) if target in GROUPS else None
        if groups:
            hit_m = {n for n in modules if group_of(n) in groups}
            hit_p = {n for n in params if group_of(n) in groups}
        else:                    # an explicit name: a full name or a dotted suffix, as peft matches names
            pattern = re.compile(rf"(^|.*\.){re.escape(target)}$")
            hit_m = {n for n in modules if pattern.match(n)}
            hit_p = {n for n in params if pattern.match(n)}
        if not hit_m and not hit_p and target not in GROUPS:
            raise ConfigError(f"LoRA target {target!r} matches no linear layer or expert parameter of the model",
                              where="sft.lora.targets",
                              fix=f"use groups ({', '.join(GROUPS + (ALL,))}) or names such as "
                                  f"{', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules})[:6])}")
        chosen_m |= hit_m
        chosen_p |= hit_p
    if not chosen_m and not chosen_p:
        raise ConfigError(f"LoRA targets {targets} select nothing in this model", where="sft.lora.targets",
                          fix="a dense model has no experts: use attention, dense_mlp or all")
    order = {n: i for i, n in enumerate(modules + params)}
    return sorted(chosen_m, key=order.__getitem__), sorted(chosen_p, key=order.__getitem__)


@contextlib.contextmanager
def exact_targets():
    """peft exactly as configured: no transformers-v4-to-v5 MoE rewrite of gate/up/down_proj targets."""
    from peft.utils import transformers_weight_conversion as conversion

    saved = conversion._convert_peft_config_moe
    conversion._convert_peft_config_moe = lambda peft_config, model: None
    try:
        yield
    finally:
        conversion._convert_peft_config_moe = saved


def peft_config(settings: LoraSettings, modules: list[str], params: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=modules or None, target_parameters=params or None, bias="none",
                      task_type="CAUSAL_LM")


def load_options(cfg) -> dict:
    """Extra from_pretrained arguments: QLoRA's 4-bit base (NF4, double quantisation, bf16 compute)."""
    if cfg.method != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def apply_lora(model, settings: LoraSettings):
    """The peft model (base frozen, adapters trainable) and the resolved (modules, params)."""
    from peft import get_peft_model

    modules, params = resolve_targets(model, settings.targets)
    with exact_targets():
        model = get_peft_model(model, peft_config(settings, modules, params))
    return model, modules, params


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def describe(settings: LoraSettings, modules: list[str], params: list[str], method: str) -> dict:
    """What `<output_dir>/lora.json` holds: the settings and the exact adapted names (convert merges these)."""
    return {"method": method, "rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "targets": list(settings.targets), "modules": modules, "parameters": params}


def attach(model, cfg, output_dir: Path, rank: int):
    """The SFT hook: adapters on the loaded base, the adapted names printed and written (rank 0) to
    `<output_dir>/lora.json` before training starts."""
    from deepspeed.utils import set_z3_leaf_module

    model, modules, params = apply_lora(model, cfg.lora)
    # ZeRO-3 traces module calls to prefetch; peft nests one wrapper per expert parameter around the experts
    # module, whose calls vary with routing ("tracing error" on resume): fetch each stack as one unit.
    for container in sorted({name.rsplit(".", 1)[0] for name in params}):
        set_z3_leaf_module(model.base_model.model.get_submodule(container), True)
    if rank == 0:
        if cfg.method == "qlora":
            print(f"[sft] qlora: base in 4 bit (NF4, double quantisation, bf16 compute), "
                  f"{model.get_memory_footprint() / 2**20:.1f} MiB with the adapters", flush=True)
        trained = trainable_names(model)
        print(f"[sft] {cfg.method}: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}; {len(modules)} modules and "
              f"{len(params)} expert parameters adapted ({len(trained)} trainable tensors):", flush=True)
        for name in modules + params:
            print(f"[sft]   {name}", flush=True)
        atomic_write_text(Path(output_dir) / TARGETS_FILE,
                          json.dumps(describe(cfg.lora, modules, params, cfg.method), indent=2) + "\n")
    return model


def save_adapter(model, folder: Path, rank: int) -> None:
    """The adapter in peft's own format (adapter_config.json + adapter_model.safetensors), gathered one
    trainable tensor at a time from the ZeRO-3 partitions (every rank takes part; rank 0 writes)."""
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    if rank == 0:
        model.save_pretrained(str(folder), state_dict=state, save_embedding_layers=False)
        atomic_write_text(Path(folder) / MERGE_MAP, json.dumps(merge_map(model), indent=2) + "\n")


def merge_map(model) -> dict:
    """What a merge needs beyond the adapter file, read off the live peft model: for each adapted weight
    (the model's in-memory name), the adapter's key prefix, its scaling, and for fused experts their count
    and layout (peft's `e o i` when it swapped in/out features, else `e i o`)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            targets[f"{plain}.{module.parameter_name}"] = {
                "key": name, "scaling": module.scaling["default"], "experts": module.num_experts,
                "layout": "e o i" if module._did_swap_in_out_features else "e i o"}
        else:
            targets[f"{plain}.weight"] = {"key": name, "scaling": module.scaling["default"], "experts": 0}
    return {"format": 1, "targets": targets}
