"""The SFT stage's settings: one schema shared by job-spec validation (orchestrator side, no torch)
and the trainer (node side). `TrainConfig.from_dict` rejects unknown keys and wrong types by name."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from clusterctl.errors import ConfigError
from clusterctl.schema import parse

BUILTIN_TINY_MODEL = "builtin:tiny-deepseek-v3"
BUILTIN_TINY_DATA = "builtin:tiny-reasoning"


@dataclass
class TrainConfig:
    model: str = BUILTIN_TINY_MODEL          # HF folder, or the built-in tiny DeepSeek-V3
    data: str = BUILTIN_TINY_DATA            # JSONL / JSON array of conversations
    output_dir: str = ""                     # checkpoints: <output_dir>/<tag>/ + marker; <output_dir>/hf/
    metrics_file: str = ""                   # JSONL, one line per optimizer step (rank 0)
    tensorboard_dir: str = ""
    max_length: int = 32768
    packing: bool = False
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
    save_steps: int = 100
    save_total_limit: int = 2
    seed: int = 42

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "train.json", prefix: str = "") -> "TrainConfig":
        """Parse and check; errors name `where` (a file, or file:line) and the field."""
        config = parse(cls, values, where, prefix=prefix)
        config.validate(lambda name: f"{getattr(values, 'lines', {}).get(prefix + name, where)}: {prefix}{name}")
        return config

    def validate(self, at) -> None:
        """Cross-field checks; `at(field)` says where a field was written."""
        if self.zero_stage not in (2, 3):
            raise ConfigError("ZeRO stage must be 2 or 3", where=at("zero_stage"))
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("parameter offload needs ZeRO stage 3", where=at("offload_param"),
                              fix="set zero_stage: 3 or offload_param: false")
        for name in ("micro_batch", "grad_accum", "max_length", "sequence_parallel", "save_steps",
                     "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", where=at(name))
        if self.packing and self.sequence_parallel > 1:
            raise ConfigError("packing with sequence_parallel > 1 is not supported (Ulysses attention runs plain "
                              "causal attention over each row)", where=at("packing"),
                              fix="set packing: false (batches are grouped by length instead)")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), where=str(path))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

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
