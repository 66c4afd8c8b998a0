"""The SFT stage's settings: one schema shared by job-spec validation (orchestrator side, no torch)
and the trainer (node side). `TrainConfig.from_dict` rejects unknown keys and wrong types by name."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from clusterctl.errors import ConfigError
from clusterctl.schema import JsonSettings
from clusterctl.training.lora import METHODS, LoraSettings

BUILTIN_TINY_MODEL = "builtin:tiny-deepseek-v3"
BUILTIN_TINY_DATA = "builtin:tiny-reasoning"
BUILTIN_FIRST_RUN_DATA = "builtin:tiny-first-run"     # 4 of its conversations: the embedded default learns them
BUILTIN_DATA_FILES = {BUILTIN_TINY_DATA: "tiny_reasoning.jsonl", BUILTIN_FIRST_RUN_DATA: "tiny_first_run.jsonl"}


@dataclass
class TrainConfig(JsonSettings):
    model: str = BUILTIN_TINY_MODEL          # HF folder, or the built-in tiny DeepSeek-V3
    data: str = BUILTIN_TINY_DATA            # JSONL / JSON array of conversations
    output_dir: str = ""                     # checkpoints: <output_dir>/<tag>/ + marker; <output_dir>/hf/
    metrics_file: str = ""                   # JSONL, one line per optimizer step (rank 0)
    tensorboard_dir: str = ""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # + mlflow, wandb, swanlab (tracking.py)
    eval_data: str = ""                      # held-out conversations (absolute path), or:
    eval_ratio: float = 0.0                  # this fraction of `data` held out (deterministic from seed)
    eval_steps: int = 0                      # eval loss every N steps; 0: at step 0 and the end only
    select: str = "last"                     # the checkpoint convert takes: last, or best (lowest eval loss)
    max_length: int = 32768
    packing: bool = False
    data_cache_dir: str = ""                 # the tokenized data cache (absolute, shared by the nodes); "" = datacache's default
    micro_batch: int = 2
    grad_accum: int = 16
    epochs: float = 1.0
    max_steps: int = 0                       # 0: derived from epochs
    lr: float = 2e-7
    min_lr_ratio: float = 0.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    zero_stage: int = 3
    offload_optimizer: bool = True
    offload_param: bool = True
    bf16: bool = True
    gradient_checkpointing: bool = True
    sequence_parallel: int = 1
    expert_groups: int = 0                   # routed experts gathered in this many groups per layer (training/experts.py); 0: automatic, 1: whole layer
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 42
    collective_timeout_s: float = 600.0      # a collective that never returns fails the rank (torch's default: 30 min)
    hang_timeout_s: float = 900.0            # a rank with no optimizer step this long: its node is stopped (watchdog.py)
    method: str = "full"                     # full | lora | qlora (training/lora.py)
    lora: LoraSettings = field(default_factory=LoraSettings)   # used when method is lora or qlora

    def validate(self, at) -> None:
        """Cross-field and range checks; `at(field)` says where a field was written."""
        from clusterctl.training.evaluation import check_eval_settings
        from clusterctl.training.tracking import check_report_to
        check_report_to(self.report_to, at)
        check_eval_settings(self, at)
        check_optimisation(self, at, counts=("micro_batch", "grad_accum", "max_length", "sequence_parallel",
                                             "save_steps", "save_total_limit"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"must be between 0 and 1, got {self.min_lr_ratio}", where=at("min_lr_ratio"))
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ConfigError(f"expected two betas in [0, 1), got {self.adam_betas}", where=at("adam_betas"),
                              fix="e.g. adam_betas: [0.9, 0.999]")
        if self.packing and self.sequence_parallel > 1:
            raise ConfigError("packing with sequence_parallel > 1 is not supported (Ulysses attention runs plain "
                              "causal attention over each row)", where=at("packing"),
                              fix="set packing: false (batches are grouped by length instead)")
        if self.data_cache_dir and not os.path.isabs(os.path.expanduser(self.data_cache_dir)):
            raise ConfigError(f"data_cache_dir {self.data_cache_dir!r} is not an absolute path", where=at("data_cache_dir"),
                              fix="give a folder on the file system every node shares, e.g. /shared/data-cache")
        for name in ("collective_timeout_s", "hang_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be above 0 seconds, got {getattr(self, name)}", where=at(name),
                                  fix="above the longest step, checkpoint save or evaluation (e.g. 600 / 900)")
        if self.expert_groups < 0:
            raise ConfigError(f"must be 0 (automatic) or a divisor of the routed experts, got {self.expert_groups}",
                              where=at("expert_groups"), fix="e.g. expert_groups: 16 for DeepSeek-V3's 256 experts")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}", where=at("method"), fix=f"use one of: {', '.join(METHODS)}")
        if self.method == "qlora" and self.zero_stage != 2:
            raise ConfigError("QLoRA's 4-bit base cannot be partitioned by ZeRO-3", where=at("zero_stage"),
                              fix="set zero_stage: 2 and offload_param: false (the adapters' states are split)")

    def ds_config(self) -> dict:
        """The DeepSpeed config the engine is built from (sft/ds_config.json in the run folder)."""
        zero: dict = {"stage": self.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                      "reduce_bucket_size": 5e8}
        if self.zero_stage == 3:
            zero.update(stage3_gather_16bit_weights_on_model_save=False,
                        stage3_prefetch_bucket_size=5e8, stage3_param_persistence_threshold=1e6)
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,
            "bf16": {"enabled": self.bf16},
            "zero_optimization": zero,
            "sequence_parallel_size": self.sequence_parallel,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }


def check_optimisation(settings, at, *, counts: tuple[str, ...]) -> None:
    """The range checks every trainer's optimisation settings share (SFT's and the RL kinds'), so a bad value
    is refused at submit, naming the field, whichever kind it was written for. `counts` must be at least 1."""
    if settings.zero_stage not in (2, 3):
        raise ConfigError("ZeRO stage must be 2 or 3", where=at("zero_stage"))
    if settings.offload_param and settings.zero_stage != 3:
        raise ConfigError("parameter offload needs ZeRO stage 3", where=at("offload_param"),
                          fix="set zero_stage: 3 or offload_param: false")
    for name in counts:
        if getattr(settings, name) < 1:
            raise ConfigError(f"must be at least 1, got {getattr(settings, name)}", where=at(name))
    for name in ("max_steps", "weight_decay", "grad_clip", "seed"):
        if getattr(settings, name) < 0:
            raise ConfigError(f"must not be negative, got {getattr(settings, name)}", where=at(name))
    if settings.lr <= 0:
        raise ConfigError(f"the learning rate must be above 0, got {settings.lr}", where=at("lr"))
    if settings.epochs <= 0:
        raise ConfigError(f"epochs must be above 0, got {settings.epochs}", where=at("epochs"),
                          fix="e.g. epochs: 1 (or set max_steps, which takes precedence)")
    if not 0 <= settings.warmup_ratio <= 1:
        raise ConfigError(f"must be between 0 and 1, got {settings.warmup_ratio}", where=at("warmup_ratio"))
