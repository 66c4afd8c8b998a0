"""Ulysses sequence parallelism for any transformers model, MLA included (shared/RECIPES.md §4.9).

Each rank of a sequence-parallel group holds 1/sp of every sequence. Attention is the only place tokens
meet: DeepSpeed's `DistributedAttention` all-to-alls q, k, v from [batch, seq/sp, heads, dim] to
[batch, seq, heads/sp, dim], runs ordinary causal SDPA on whole sequences, and all-to-alls the output
back. q/k and v may have different head sizes (DeepSeek's MLA: 96 vs 32): each tensor is exchanged on
its own, so no padding shim is needed. The attention mask is never used: batches are right-padded and
causal attention alone is exact for every real token, which is also why packing is refused with sp > 1.

Loss: a rank sees a slice of each sequence, so `loss_scale()` turns its token-sum into a share of the
group's token mean, times sp, because DeepSpeed averages gradients over all ranks (no mpu given):
(1/world) * sum_ranks(sp * local_sum / group_count) = mean over data-parallel groups of the exact loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ATTENTION_NAME = "clusterctl_ulysses"


def new_groups(world_size: int, sp: int):
    """Create every sequence-parallel group (all ranks must call this); return this rank's group.
    Groups are consecutive ranks, so a group stays inside a node when sp divides the GPUs per node."""
    rank = dist.get_rank()
    mine = None
    for first in range(0, world_size, sp):
        group = dist.new_group(list(range(first, first + sp)))
        if first <= rank < first + sp:
            mine = group
    return mine


def register(group) -> str:
    """Register the Ulysses attention with transformers; load the model with attn_implementation=<name>."""
    from deepspeed.sequence.layer import DistributedAttention
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    def local_attention(query, key, value, module, dropout, scaling):
        # [batch, seq, heads/sp, dim] -> sdpa's [batch, heads, seq, dim]; returns [batch, seq, heads/sp, dim]
        out, _ = sdpa_attention_forward(module, query.transpose(1, 2), key.transpose(1, 2),
                                        value.transpose(1, 2), None, dropout=dropout, scaling=scaling,
                                        is_causal=True)
        return out

    distributed = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = distributed(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0, None,
                          module, dropout, scaling)
        return out, None

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)
    return ATTENTION_NAME


def shard(tensor: torch.Tensor, sp_rank: int, sp: int) -> torch.Tensor:
    """This rank's contiguous slice of the sequence dimension (dim 1; its length divides by sp)."""
    length = tensor.shape[1] // sp
    return tensor[:, sp_rank * length:(sp_rank + 1) * length].contiguous()


def loss_scale(local_count: torch.Tensor, group, sp: int) -> torch.Tensor:
    """The factor turning this rank's summed token loss into its share of the exact loss (see module doc)."""
    total = local_count.detach().clone()
    if sp > 1:
        dist.all_reduce(total, group=group)
    return sp / total.clamp(min=1)
