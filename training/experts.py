"""Routed experts in G bounded groups, so ZeRO-3 gathers (and reduce-scatters) one group at a time.

transformers 5 fuses a MoE layer's routed experts into two 3-D parameters (`mlp.experts.gate_up_proj
[E, 2I, H]`, `down_proj [E, H, I]`). DeepSpeed ZeRO-3 fetches a module's own parameters in its pre-forward
hook and releases them in its post-forward hook (and the same around the backward), so one fused module
means all E experts gathered at once: 11.3 B parameters per layer for DeepSeek-V3 671B, and their full
gradient before the reduce-scatter.  `regroup` replaces each such module by `GroupedExperts`: G child
modules of the model's own experts class holding E/G experts each (names become
`mlp.experts.groups.<g>.gate_up_proj`), whose forward calls every child in turn, so the hooks fetch,
use and release one group after another, each on its own (token, expert) pairs only (all groups' rows
together are the fused forward's, so activations are not multiplied by G).  Every child is called on every
rank, routed tokens or not: a ZeRO-3 fetch is a collective.  The result is the fused forward's (the same
experts on the same tokens, summed in another order).

Under ZeRO-3 the regrouping happens after `from_pretrained` (weights loaded partitioned by zero.Init) and
before `deepspeed.initialize`: each group is assembled from the ranks' partitions by one all-reduce of
that group's elements and re-partitioned at once, so no rank ever holds more than one group in full.
No torch import at module level: the planner uses `default_groups`.
"""
from __future__ import annotations

GROUP_PARAMS = 10**9        # default bound of one group: DeepSpeed's stage3_max_live_parameters default


def default_groups(experts: int, params_per_expert: int, bound: int = GROUP_PARAMS) -> int:
    """The fewest groups (a divisor of `experts`) whose group holds at most `bound` parameters."""
    for groups in range(1, experts + 1):
        if experts % groups == 0 and experts // groups * params_per_expert <= bound:
            return groups
    return experts


def groups_for(config, requested: int = 0) -> int:
    """The groups a model (config object or config.json dict) trains with: `requested` (train.json's
    expert_groups), or for 0 the default bound; 1 for a model without routed experts."""
    def get(key: str) -> int:
        return int((config.get(key) if isinstance(config, dict) else getattr(config, key, None)) or 0)

    experts = get("n_routed_experts")
    if experts <= 1:
        return 1
    if requested:
        return requested
    return default_groups(experts, 3 * get("hidden_size") * get("moe_intermediate_size"))


def _grouped_class():
    import torch
    from torch import nn

    class GroupedExperts(nn.Module):
        """The fused experts' forward (hidden, top_k_index, top_k_weights), run one group at a time."""

        def __init__(self, groups: list[nn.Module]):
            super().__init__()
            self.groups = nn.ModuleList(groups)
            self.per_group = groups[0].num_experts
            self.num_experts = self.per_group * len(groups)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for g, group in enumerate(self.groups):
                # this group's (token, expert) pairs only, one per row: the rows of all groups together are
                # the fused forward's, so no activation is held G times
                local = top_k_index - g * self.per_group
                token, slot = torch.nonzero((local >= 0) & (local < self.per_group), as_tuple=True)
                index, weight = local[token, slot], top_k_weights[token, slot]
                if token.numel() == 0:    # still called: under ZeRO-3 its fetch is a collective of every rank
                    token, index, weight = token.new_zeros(1), index.new_zeros(1), weight.new_zeros(1)
                rows = group(hidden_states[token], index[:, None], weight[:, None])
                out = out.index_add(0, token, rows.to(out.dtype))
            return out

    return GroupedExperts


_RELEASING: dict[type, type] = {}


def _releasing_class(base: type) -> type:
    """`base` (the model's experts class) keeping no view of its gathered weights for the backward.

    The experts' forward indexes its 3-D weights per expert, and autograd saves those views for the
    backward; a view keeps the whole gathered tensor alive after ZeRO-3 releases the parameter, so every
    group of a layer would stay gathered until its own backward: the whole layer at once (measured in
    bench/memory). Here the forward runs without a graph, saving only its inputs, and the backward runs
    it again on the weights ZeRO-3 has gathered for this group's backward (a module-sized recompute, as
    in gradient checkpointing). Used for trained weights under ZeRO-3 only: a frozen base (LoRA) keeps
    the plain forward, its adapters being applied only inside the wrapper's own forward."""
    if base in _RELEASING:
        return _RELEASING[base]
    import torch

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, module, hidden_states, top_k_index, top_k_weights):
            ctx.module = module
            ctx.save_for_backward(hidden_states, top_k_index, top_k_weights)
            return base.forward(module, hidden_states, top_k_index, top_k_weights)

        @staticmethod
        def backward(ctx, grad):
            hidden_states, top_k_index, top_k_weights = ctx.saved_tensors
            with torch.enable_grad():
                hidden = hidden_states.detach().requires_grad_(hidden_states.requires_grad)
                weights = top_k_weights.detach().requires_grad_(top_k_weights.requires_grad)
                # the parameters' gradients accumulate as in any backward (ZeRO-3's reduce hooks fire)
                torch.autograd.backward(base.forward(ctx.module, hidden, top_k_index, weights), grad)
            return None, hidden.grad, None, weights.grad

    class ReleasingExperts(base):  # type: ignore[misc, valid-type]
        def forward(self, hidden_states, top_k_index, top_k_weights):
            if torch.is_grad_enabled() and self.gate_up_proj.requires_grad and _zero3(self.gate_up_proj):
                return Recompute.apply(self, hidden_states, top_k_index, top_k_weights)
            return super().forward(hidden_states, top_k_index, top_k_weights)

    _RELEASING[base] = ReleasingExperts
    return ReleasingExperts


def fused_experts(model) -> list:
    """(name, module) of every fused routed-experts module (3-D gate_up_proj and down_proj)."""
    import torch

    def three_d(param) -> bool:       # a ZeRO-3 partitioned parameter keeps its shape in ds_shape
        return isinstance(param, torch.nn.Parameter) and len(getattr(param, "ds_shape", param.shape)) == 3

    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "num_experts") and three_d(getattr(module, "gate_up_proj", None))
            and three_d(getattr(module, "down_proj", None))]


def _zero3(param) -> bool:
    return hasattr(param, "ds_id")


def _group_elements(param, lo: int, hi: int):
    """Flat elements [lo, hi) of a ZeRO-3 partitioned parameter, on every rank: each rank writes the part
    its partition holds and one all-reduce (sum with zeros: exact) assembles them."""
    import deepspeed.comm as dist
    import torch
    from deepspeed.accelerator import get_accelerator

    part = param.ds_tensor
    size = part.ds_numel                               # every rank's partition: the padded numel / ranks
    start = dist.get_rank(group=param.ds_process_group) * size
    buffer = torch.zeros(hi - lo, dtype=param.dtype, device=get_accelerator().current_device_name())
    a, b = max(lo, start), min(hi, start + size, param.ds_numel)
    if a < b:
        buffer[a - lo:b - lo].copy_(part.flatten()[a - start:b - start])
    dist.all_reduce(buffer, group=param.ds_process_group)
    return buffer


def _build(module, groups: int, ds_config: dict | None):
    """The GroupedExperts equal to fused `module`, partitioned like it under ZeRO-3."""
    import contextlib
    import copy
    import math

    per_group = module.num_experts // groups
    config = copy.copy(module.config)
    for key in ("n_routed_experts", "num_local_experts", "num_experts"):
        if key in getattr(config, "attribute_map", {}) or hasattr(config, key):
            with contextlib.suppress(AttributeError):
                setattr(config, key, per_group)
    sharded = _zero3(module.gate_up_proj)
    dtype = module.gate_up_proj.dtype
    if sharded:
        import deepspeed
        init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    else:
        init = contextlib.nullcontext()
    with init:
        children = [_releasing_class(type(module))(config) for _ in range(groups)]
    grouped = _grouped_class()(children)
    for name in ("gate_up_proj", "down_proj"):
        fused = getattr(module, name)
        per = fused.ds_shape[1:] if sharded else fused.shape[1:]
        numel = per_group * math.prod(per)
        for g, child in enumerate(children):
            target = getattr(child, name)
            if sharded:
                import deepspeed
                full = _group_elements(fused, g * numel, (g + 1) * numel)
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    target.data.copy_(full.view(target.shape))
                del full
            else:
                target.data = fused.data[g * per_group:(g + 1) * per_group].clone().to(dtype)
            target.requires_grad_(fused.requires_grad)
    return grouped


def regroup(model, groups: int, ds_config: dict | None = None) -> int:
    """Replace every fused routed-experts module of `model` by G groups (1: leave the model as it is).
    `ds_config` is the DeepSpeed config the model was partitioned with (ZeRO-3). Returns how many
    modules were replaced."""
    if groups <= 1:
        return 0
    found = [name for name, _ in fused_experts(model)]
    for name in found:                     # one layer's module referenced at a time: each is freed once replaced
        module = model.get_submodule(name)
        if module.num_experts % groups:
            from clusterctl.errors import UserError
            raise UserError(f"expert_groups {groups} does not divide the {module.num_experts} routed experts of {name}",
                            where="train.json.expert_groups", fix="use a divisor of n_routed_experts (or 0: automatic)")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _build(module, groups, ds_config))
        del module
    return len(found)
