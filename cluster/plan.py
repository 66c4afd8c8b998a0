"""Memory planner for full-parameter SFT with DeepSpeed ZeRO-2/3 (+offload) and Ulysses SP. No torch.

Symbols: P parameters (from config.json), W = nodes x gpus_per_node ranks, S = sequence parallel size,
B micro-batch, L sequence length, T = B*L/S tokens per rank, h hidden size, V vocabulary, n layers,
Pmax the largest single module's own parameters (for DeepSeek-V3 on transformers 5 one layer's fused
experts, 256 x 3 x 7168 x 2048 = 11.3 B, unless the trainer splits them: `expert_groups` G, as
train.json's (training/experts.py), makes each group a module of E/G experts; 0 is the trainer's
default, groups of at most 1e9 parameters: 16 groups of 0.70 B for 671B; 1 is the whole layer),
b = 2 bytes (bf16).

Per GPU (model states follow DeepSpeed's own estimators, estimate_zero{2,3}_model_states_mem_needs):
  ZeRO-3  params     b*P/W                (0 with offload_param: they live in host RAM)
          grads+opt  16*P/W               fp32 grad partition 4 + fp32 master/m/v 12 (0 with offload_optimizer)
          gathered   b*min(P, max(Pmax, live))   parameters kept gathered: DeepSpeed keeps up to
                                          stage3_max_live_parameters (live, 1e9 by default) alive, and
                                          at least the largest module
          module grad b*Pmax              the largest module's full gradient before its reduce-scatter
          buckets    b*(prefetch + reduce bucket elements), each at most P
  ZeRO-2  params     b*P, grads b*P       every rank holds all bf16 params and, in backward, all grads
          opt        16*P/W               (0 with offload_optimizer)
  both    opt step   4*P/W                torch AdamW's foreach temporaries (sqrt of v) when the optimizer
                                          is on the GPU; DeepSpeed's CPU Adam (offload) works in place
  activations, gradient checkpointing on:
          n*T*h*b                         each layer's checkpointed input
        + 2 * layer(T)                    one layer recomputed and its activation grads
        + C*V*(b + 4 + 4 + 4)             one chunk's logits in bf16, their fp32 copy, log-softmax and its
                                          grad: the trainer computes the loss over chunks of C = min(T,
                                          training.loss.chunk_tokens(V)) tokens (593 at V = 129,280)
    layer(T) = b*T*(attention widths + MLP widths): MLA q/kv low-rank and per-head projections, the
    attention output, Ulysses' all-to-all copies of q/k/v/out; MoE: top_k routed experts + shared experts
    (3 x moe_intermediate each) + router scores + the routed pairs' gathered inputs (top_k x h); dense
    layers 3 x intermediate.
    Without checkpointing every layer keeps layer(T): n * layer(T) instead of the first two terms.
  runtime  CUDA context, NCCL and allocator slack: runtime_gib (default 3 GiB; 0 on CPU-only runs)

Host RAM per node (gpus_per_node ranks):
  offload_optimizer  16*P/W per rank (fp32 master, m, v, fp32 grads), pinned
  offload_param      b*P/W per rank
  loading            the checkpoint shard being read, min(load_shard_gib (5), b*P) (zero.Init partitions
                     while loading, so the whole model never sits in RAM; mapped pages count in RSS)
  per process        host_runtime_gib per rank (Python, torch, CUDA libraries; default 4 GiB)
Everything is rounded up by `buffer_factor` (1.1): allocator fragmentation and temporaries.

LoRA / QLoRA (method): grads, optimizer states, their offload and the optimizer step scale with the LoRA
parameters T (every target group, ModelShape.lora_params) instead of P; the frozen base is still partitioned,
gathered and offloaded like full SFT's parameters, except that with gradient checkpointing a whole layer of it
stays gathered in the backward: DeepSpeed attributes the frozen parameters a layer's recompute gathers to the
module whose backward is running and releases them only with it, and the experts' forward saves views of its
3-D weights, which keep the gathered tensors alive until their own backward (trained weights are recomputed
per group instead: training/experts.py). Gathered term: max(layer, live) instead of max(Pmax, live); without
checkpointing, experts that save views (a frozen base, or fused trained experts) hold every MoE layer's experts
(`held_gathered`). QLoRA holds the whole NF4 base (routed experts stay bf16)
on every GPU under ZeRO-2.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from clusterctl import modelconfig
from clusterctl.errors import UserError
from clusterctl.training.experts import groups_for
from clusterctl.training.loss import BYTES_PER_LOGIT, chunk_tokens

GIB = 1024 ** 3
BF16 = 2


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a Hugging Face config.json (DeepSeek-V3 or a dense Llama-like)."""
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    dense_layers: int = 0           # first_k_dense_replace (MoE models)
    moe_intermediate: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    top_k: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0           # > 0: DeepSeek MLA
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config.json") -> ModelShape:
        def n(key: str, minimum: int = 1, default: int | None = None) -> int:
            return modelconfig.count(cfg, key, where, minimum=minimum, default=default)

        heads, hidden = n("num_attention_heads"), n("hidden_size")
        shape = dict(vocab=n("vocab_size"), hidden=hidden, layers=n("num_hidden_layers"), heads=heads,
                     kv_heads=n("num_key_value_heads", default=heads),
                     head_dim=n("head_dim", default=max(hidden // heads, 1)),
                     intermediate=n("intermediate_size"), tied=bool(cfg.get("tie_word_embeddings", False)))
        if cfg.get("n_routed_experts"):
            shape.update(dense_layers=n("first_k_dense_replace", 0, default=0),
                         moe_intermediate=n("moe_intermediate_size"), routed_experts=n("n_routed_experts"),
                         shared_experts=n("n_shared_experts", 0, default=0), top_k=n("num_experts_per_tok"))
        if cfg.get("kv_lora_rank"):
            shape.update(q_lora_rank=n("q_lora_rank", 0, default=0), kv_lora_rank=n("kv_lora_rank"),
                         qk_nope=n("qk_nope_head_dim", 0), qk_rope=n("qk_rope_head_dim", 0), v_head=n("v_head_dim"))
        return cls(**shape)  # type: ignore[arg-type]

    # -- parameter counts ---------------------------------------------------------------------------
    def attention_params(self) -> int:
        h, H = self.hidden, self.heads
        if self.kv_lora_rank:
            qk = self.qk_nope + self.qk_rope
            q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk) if self.q_lora_rank else h * H * qk
            kv = h * (self.kv_lora_rank + self.qk_rope) + self.kv_lora_rank + self.kv_lora_rank * H * (self.qk_nope + self.v_head)
            return q + kv + H * self.v_head * h
        d = self.head_dim
        return h * H * d + 2 * h * self.kv_heads * d + H * d * h

    def experts_params(self) -> int:
        """The routed experts of one MoE layer: one fused module in transformers 5."""
        return self.routed_experts * 3 * self.hidden * self.moe_intermediate

    def mlp_params(self, moe: bool) -> int:
        if not moe:
            return 3 * self.hidden * self.intermediate
        shared = self.shared_experts * 3 * self.hidden * self.moe_intermediate
        return self.experts_params() + shared + self.routed_experts * self.hidden

    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.routed_experts else 0

    def params(self) -> int:
        per_layer_common = self.attention_params() + 2 * self.hidden
        dense = self.layers - self.moe_layers()
        total = self.layers * per_layer_common + dense * self.mlp_params(False)
        total += self.moe_layers() * self.mlp_params(True)
        return total + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_params(self, rank: int) -> tuple[int, int]:
        """(all, largest module's) LoRA parameters with every target group adapted (training/lora.py "all"):
        r x (in + out) per linear layer, per expert for the fused routed experts (peft's target_parameters)."""
        h, H, r = self.hidden, self.heads, rank
        if self.kv_lora_rank:
            qk = self.qk_nope + self.qk_rope
            q = [(h, self.q_lora_rank), (self.q_lora_rank, H * qk)] if self.q_lora_rank else [(h, H * qk)]
            attention = q + [(h, self.kv_lora_rank + self.qk_rope), (self.kv_lora_rank, H * (self.qk_nope + self.v_head)),
                             (H * self.v_head, h)]
        else:
            d = self.head_dim
            attention = [(h, H * d), (h, self.kv_heads * d), (h, self.kv_heads * d), (H * d, h)]
        per_attention = sum(r * (i + o) for i, o in attention)
        dense = 3 * r * (h + self.intermediate)
        shared = self.shared_experts * 3 * r * (h + self.moe_intermediate)
        routed = self.routed_experts * r * ((h + 2 * self.moe_intermediate) + (self.moe_intermediate + h))
        total = self.layers * per_attention + (self.layers - self.moe_layers()) * dense
        total += self.moe_layers() * (shared + routed)
        return total, max(per_attention, dense, routed if self.routed_experts else 0)

    def quantized_base_bytes(self) -> float:
        """QLoRA's base: NF4 with double quantisation (about 4.13 bits) for every linear layer, bf16 for the
        embeddings, norms and the fused routed experts (bitsandbytes has no 4-bit path for 3-D parameters)."""
        unquantized = self.vocab * self.hidden * (1 if self.tied else 2) + self.moe_layers() * self.experts_params()
        return 4.13 / 8 * (self.params() - unquantized) + BF16 * unquantized

    def expert_groups(self, requested: int = 0) -> int:
        """The groups the trainer splits each layer's routed experts into (training/experts.py)."""
        return groups_for({"n_routed_experts": self.routed_experts, "hidden_size": self.hidden,
                           "moe_intermediate_size": self.moe_intermediate}, requested)

    def layer_params(self) -> int:
        """The largest decoder layer's own parameters (attention, norms and its MLP or MoE block)."""
        mlp = self.mlp_params(True) if self.moe_layers() else self.mlp_params(False)
        return self.attention_params() + 2 * self.hidden + mlp

    def largest_module_params(self, expert_groups: int = 0) -> int:
        """The largest module's own parameters, routed experts split in `expert_groups` as the trainer does."""
        candidates = [self.vocab * self.hidden, self.attention_params(), 3 * self.hidden * self.intermediate]
        if self.routed_experts:
            candidates.append(self.experts_params() // self.expert_groups(expert_groups))
        return max(candidates)

    # -- activations of one layer for T tokens on this rank -----------------------------------------
    def layer_activation_bytes(self, tokens: int) -> int:
        h, H = self.hidden, self.heads
        if self.kv_lora_rank:
            qk = self.qk_nope + self.qk_rope
            attention = (self.q_lora_rank + self.kv_lora_rank + self.qk_rope + H * qk      # low-rank, q
                         + H * (self.qk_nope + self.v_head) + H * qk + H * self.v_head)  # kv_b out, k, attn out
            exchanged = H * (2 * qk + 2 * self.v_head)                                    # Ulysses all-to-all copies
        else:
            d = self.head_dim
            attention = H * d + 2 * self.kv_heads * d + H * d
            exchanged = 2 * H * d + 2 * self.kv_heads * d
        mlp = 3 * self.intermediate
        if self.routed_experts:
            moe = ((self.top_k + self.shared_experts) * 3 * self.moe_intermediate + 2 * self.routed_experts
                   + self.top_k * h)        # each routed (token, expert) pair's gathered input row
            mlp = max(mlp if self.dense_layers else 0, moe)
        return BF16 * tokens * (attention + exchanged + mlp + 4 * h)


@dataclass(frozen=True)
class Setup:
    nodes: int = 1
    gpus_per_node: int = 8
    sp: int = 1
    zero: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch: int = 1
    seq_len: int = 4096
    gradient_checkpointing: bool = True
    gpu_memory_gib: float = 80.0
    host_memory_gib: float = 2048.0
    runtime_gib: float = 3.0            # CUDA context, NCCL, allocator slack per GPU
    host_runtime_gib: float = 4.0       # per rank process on the host
    prefetch_bucket: float = 5e8        # elements (DeepSpeed stage3_prefetch_bucket_size)
    reduce_bucket: float = 5e8          # elements (reduce_bucket_size)
    max_live_parameters: float = 1e9    # elements (stage3_max_live_parameters)
    load_shard_gib: float = 5.0
    buffer_factor: float = 1.1
    expert_groups: int = 0              # routed-expert groups per layer (train.json's; 0: the trainer's default, 1: fused)
    method: str = "full"                # full | lora | qlora: only LoRA parameters have grads and optimizer state
    lora_rank: int = 8

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Plan:
    setup: Setup
    params: int
    largest_module: int
    gpu: dict          # component -> bytes, per GPU
    host: dict         # component -> bytes, per node
    trained: int = 0   # parameters with gradients and optimizer state (all of them, or LoRA's)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values()) * self.setup.buffer_factor

    @property
    def host_total(self) -> float:
        return sum(self.host.values()) * self.setup.buffer_factor

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_total <= self.setup.gpu_memory_gib * GIB

    @property
    def fits_host(self) -> bool:
        return self.host_total <= self.setup.host_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def to_dict(self) -> dict:
        gib = lambda d: {k: round(v / GIB, 3) for k, v in d.items()}          # noqa: E731
        return {"setup": asdict(self.setup), "params": self.params, "largest_module_params": self.largest_module,
                "trained_params": self.trained,
                "gpu_gib": gib(self.gpu), "gpu_total_gib": round(self.gpu_total / GIB, 3), "fits_gpu": self.fits_gpu,
                "host_gib": gib(self.host), "host_total_gib": round(self.host_total / GIB, 3),
                "fits_host": self.fits_host, "fits": self.fits}


def validate(shape: ModelShape, s: Setup) -> None:
    if s.method == "qlora" and s.zero != 2:
        raise UserError("QLoRA keeps the whole 4-bit base on every GPU (bitsandbytes weights are not ZeRO-3 "
                        "partitioned)", where="--zero", fix="use --zero 2 with --method qlora")
    if s.zero not in (2, 3):
        raise UserError("ZeRO stage must be 2 or 3", where="--zero")
    if s.offload_param and s.zero != 3:
        raise UserError("parameter offload needs ZeRO stage 3", where="--offload-param", fix="add --zero 3")
    if s.world % s.sp:
        raise UserError(f"sp {s.sp} does not divide {s.world} GPUs", where="--sp")
    if shape.heads % s.sp:
        raise UserError(f"sp {s.sp} does not divide the model's {shape.heads} attention heads", where="--sp",
                        fix="Ulysses splits heads across the sp group: choose a divisor of the head count")


def held_gathered(shape: ModelShape, s: Setup, big: int) -> int:
    """The most parameters ZeRO-3 keeps gathered at once (before stage3_max_live_parameters): the largest module,
    unless the backward holds more. A frozen base (LoRA) recomputed under gradient checkpointing stays gathered
    for its whole layer. Routed experts that are not trained in groups (a frozen base, or one fused module) save
    views of their 3-D weights for the backward, which keep the gathered tensors alive: without checkpointing,
    every MoE layer's experts from its forward to its backward (groups of trained experts save none)."""
    if s.gradient_checkpointing:
        return max(big, shape.layer_params()) if s.method != "full" else big
    views_saved = s.method != "full" or shape.expert_groups(s.expert_groups) == 1
    if shape.moe_layers() and views_saved:
        return max(big, shape.moe_layers() * shape.experts_params())
    return big


def plan(shape: ModelShape, s: Setup) -> Plan:
    validate(shape, s)
    P, W, big = shape.params(), s.world, shape.largest_module_params(s.expert_groups)
    T, big_trained = (P, big) if s.method == "full" else shape.lora_params(s.lora_rank)   # trained parameters
    tokens = math.ceil(s.micro_batch * s.seq_len / s.sp)
    gpu: dict = {}
    if s.zero == 3:
        gpu["params"] = 0 if s.offload_param else BF16 * P / W
        gpu["grads+optimizer"] = 0 if s.offload_optimizer else 16 * T / W
        gpu["gathered params"] = BF16 * min(P, max(held_gathered(shape, s, big), s.max_live_parameters))
        gpu["module grad"] = BF16 * big_trained
        gpu["buckets"] = BF16 * (min(s.prefetch_bucket, P) + min(s.reduce_bucket, T))
    else:
        gpu["params"] = shape.quantized_base_bytes() if s.method == "qlora" else BF16 * P
        gpu["grads"] = BF16 * T
        gpu["optimizer"] = 0 if s.offload_optimizer else 16 * T / W
        gpu["buckets"] = BF16 * min(s.reduce_bucket, T)
    gpu["optimizer step"] = 0 if s.offload_optimizer else 4 * T / W
    layer = shape.layer_activation_bytes(tokens)
    if s.gradient_checkpointing:
        gpu["activations"] = shape.layers * tokens * shape.hidden * BF16 + 2 * layer
    else:
        gpu["activations"] = shape.layers * layer
    gpu["logits+loss"] = min(tokens, chunk_tokens(shape.vocab)) * shape.vocab * BYTES_PER_LOGIT
    gpu["runtime"] = s.runtime_gib * GIB
    per_rank = (16 * T / W if s.offload_optimizer else 0) + (BF16 * P / W if s.offload_param else 0)
    host = {"offloaded states": per_rank * s.gpus_per_node, "loading": min(s.load_shard_gib * GIB, BF16 * P),
            "processes": s.host_runtime_gib * GIB * s.gpus_per_node}
    return Plan(s, P, big, gpu, host, trained=T)


def _offload(shape, s):
    return [] if s.offload_optimizer else [("add --offload (optimizer states to host RAM)",
                                           replace(s, offload_optimizer=True))]


def _zero3(shape, s):
    return [("use --zero 3", replace(s, zero=3))] if s.zero == 2 else []


def _offload_param(shape, s):
    return [] if s.offload_param else [("add --offload-param with --zero 3 (parameters to host RAM too)",
                                       replace(s, zero=3, offload_optimizer=True, offload_param=True))]


def _micro_batch(shape, s):
    return [("use --micro-batch 1 (raise gradient accumulation)", replace(s, micro_batch=1))] if s.micro_batch > 1 else []


def _sp(shape, s):
    return [(f"use --sp {sp}", replace(s, sp=sp)) for sp in (2, 4, 8, 16, 32, 64)
            if sp > s.sp and s.world % sp == 0 and shape.heads % sp == 0]


def _nodes(shape, s):
    return [(f"use --nodes {s.nodes * k}", replace(s, nodes=s.nodes * k)) for k in (2, 4, 8)]


CHANGES = (_offload, _zero3, _offload_param, _micro_batch, _sp, _nodes)     # cheapest first


def suggest(shape: ModelShape, s: Setup) -> tuple[str, Plan] | None:
    """The smallest change that makes the plan fit: one change if one suffices (cheapest first), else
    the changes accumulated in that order (each the smallest that fits, or its largest when none does).
    Returns (what to change, the resulting plan)."""
    for change in CHANGES:
        for text, candidate in change(shape, s):
            if plan(shape, candidate).fits:
                return text, plan(shape, candidate)
    current, applied = s, []
    for change in CHANGES:
        alternatives = change(shape, current)
        if not alternatives:
            continue
        fitting = [(t, c) for t, c in alternatives if plan(shape, c).fits]
        text, current = fitting[0] if fitting else alternatives[-1]
        applied.append(text)
        if fitting:
            return "; ".join(applied), plan(shape, current)
    return None


def load_shape(model: str) -> ModelShape:
    """A model folder, a config.json, or the built-in tiny model."""
    from clusterctl.training.config import BUILTIN_TINY_MODEL
    if model == BUILTIN_TINY_MODEL:
        from clusterctl.training.tiny import MODEL_SHAPE, VOCAB_SIZE
        return ModelShape.from_config({**MODEL_SHAPE, "vocab_size": VOCAB_SIZE, "intermediate_size": 256}, model)
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError("no such file", where=str(path),
                        fix="give a Hugging Face model folder (holding config.json) or its config.json")
    return ModelShape.from_config(modelconfig.read(path), str(path))
