"""Settings of the RL and preference kinds (grpo, dpo, simpo, ppo): one schema shared by job-spec validation
(orchestrator side, no torch) and the node-side trainers, written to `<kind>/train.json` in the run folder.
Unknown keys and wrong types are refused by name (cluster/schema.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from clusterctl.errors import ConfigError
from clusterctl.schema import JsonSettings
from clusterctl.training.config import check_optimisation

KINDS = ("grpo", "dpo", "simpo", "ppo")
ROLLOUT_ENGINES = ("transformers", "vllm-server", "trl-vllm")
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo")
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust")
NO_PPO_REWARD = "PPO needs a reward: a reward_model folder or reward functions"
PPO_REWARD_FIX = 'e.g. rewards: ["rewards.py:my_reward"] (a file beside the job spec), or reward_model: /models/rm'


@dataclass
class RolloutSettings:
    """Where completions come from. transformers: `generate` inside the trainer (any machine).
    vllm-server: a vLLM server on this node's loopback reloads the weights from disk after every optimizer
    step (works on CPU). trl-vllm: TRL's own vLLM integration (GPU only: NCCL weight transfer)."""
    engine: str = "transformers"
    vllm_mode: str = "colocate"              # trl-vllm: colocate | server
    gpu_memory_utilization: float = 0.3      # trl-vllm colocate
    port: int = 8011                         # vllm-server / trl-vllm server: loopback port
    timeout: int = 600                       # seconds for the server to come up

    def validate(self, at) -> None:
        if self.engine not in ROLLOUT_ENGINES:
            raise ConfigError(f"unknown rollout engine {self.engine!r}", where=at("engine"),
                              fix=f"use one of: {', '.join(ROLLOUT_ENGINES)}")
        if self.vllm_mode not in ("colocate", "server"):
            raise ConfigError(f"unknown vllm_mode {self.vllm_mode!r}", where=at("vllm_mode"),
                              fix="use colocate or server")


@dataclass
class GrpoSettings:
    rewards: list[str] = field(default_factory=list)      # "rewards.py:func" or "module:func"
    reward_weights: list[float] = field(default_factory=list)   # [] = all 1.0
    num_generations: int = 8                 # completions per prompt (the group)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0                        # KL coefficient against the reference; 0 = no reference model
    epsilon: float = 0.2                     # clip range of the policy ratio
    loss_type: str = "dapo"
    num_iterations: int = 1                  # optimizer passes per generation batch
    scale_rewards: str = "group"             # group | batch | none
    rollout: RolloutSettings = field(default_factory=RolloutSettings)

    def validate(self, at) -> None:
        if self.loss_type not in GRPO_LOSSES:
            raise ConfigError(f"unknown loss_type {self.loss_type!r}", where=at("loss_type"),
                              fix=f"use one of: {', '.join(GRPO_LOSSES)}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"unknown scale_rewards {self.scale_rewards!r}", where=at("scale_rewards"),
                              fix="use group, batch or none")
        if self.num_generations < 2:
            raise ConfigError("GRPO compares completions within a group: at least 2", where=at("num_generations"))
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", where=at(name))
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"{len(self.reward_weights)} weights for {len(self.rewards)} rewards",
                              where=at("reward_weights"), fix="give one weight per reward, or none")


@dataclass
class PreferenceSettings:
    """DPO (trl DPOConfig) and SimPO (trl CPOConfig with loss_type simpo, cpo_alpha 0)."""
    beta: float = 0.0                        # 0 = the kind's default: dpo 0.1, simpo 2.0
    gamma: float = 0.5                       # simpo: target reward margin as a ratio of beta
    loss_type: str = "sigmoid"               # dpo only
    label_smoothing: float = 0.0

    def validate(self, at) -> None:
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"unknown loss_type {self.loss_type!r}", where=at("loss_type"),
                              fix=f"use one of: {', '.join(DPO_LOSSES)}")
        if self.beta < 0:
            raise ConfigError("beta must be positive (0 = the default)", where=at("beta"))


@dataclass
class PpoSettings:
    """PPO (training/rl/ppo.py): actor, critic (a value head), a frozen reference copy of the actor, and a
    reward model folder (sequence classification, one label) or the user's reward functions (grpo's form)."""
    reward_model: str = ""                   # a sequence-classification model folder, or ...
    rewards: list[str] = field(default_factory=list)      # ... "rewards.py:func" (TRL's reward signature)
    reward_weights: list[float] = field(default_factory=list)   # [] = all 1.0
    value_model: str = ""                    # "" = a value head on a copy of the actor's backbone
    num_generations: int = 1                 # completions per prompt
    max_completion_length: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05                    # per-token KL penalty against the reference
    target_kl: float = 0.0                   # > 0: adapt kl_coef toward this KL per sequence
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4                      # passes over each rollout batch
    num_mini_batches: int = 1                # optimizer steps per pass
    whiten_rewards: bool = False

    def validate(self, at) -> None:
        for name in ("num_generations", "max_completion_length", "ppo_epochs", "num_mini_batches", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError("must be at least 1", where=at(name))
        for name in ("kl_coef", "target_kl", "vf_coef"):
            if getattr(self, name) < 0:
                raise ConfigError("must not be negative", where=at(name))
        for name in ("cliprange", "cliprange_value", "temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError("must be positive", where=at(name))
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError("must be between 0 and 1", where=at(name))
        if self.reward_model and self.rewards:
            raise ConfigError("both reward_model and rewards are set", where=at("rewards"),
                              fix="PPO takes one reward: a reward_model folder or reward functions")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"{len(self.reward_weights)} weights for {len(self.rewards)} rewards",
                              where=at("reward_weights"), fix="give one weight per reward, or none")


@dataclass
class TrainSettings:
    """The optimisation knobs every kind shares (the job spec's `grpo:`/`dpo:`/`simpo:` sections hold them)."""
    max_length: int = 1024                   # prompt (+ response for dpo/simpo) tokens
    micro_batch: int = 4                     # grpo: completions per rank per micro-step
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0                       # 0: derived from epochs
    lr: float = 1e-6
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = False
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 42

    def validate(self, at) -> None:
        check_optimisation(self, at, counts=("micro_batch", "grad_accum", "max_length", "save_steps",
                                             "save_total_limit"))


@dataclass
class RLConfig(TrainSettings, JsonSettings):
    """train.json of a grpo/dpo/simpo stage."""
    kind: str = "grpo"
    model: str = ""                          # HF folder, or the built-in tiny model
    data: str = ""                           # JSONL: grpo {prompt, columns...}; dpo/simpo {prompt, chosen, rejected}
    output_dir: str = ""                     # checkpoint-N/global_stepN (DeepSpeed layout) + marker; hf/
    metrics_file: str = ""
    tensorboard_dir: str = ""
    grpo: GrpoSettings = field(default_factory=GrpoSettings)
    preference: PreferenceSettings = field(default_factory=PreferenceSettings)
    ppo: PpoSettings = field(default_factory=PpoSettings)

    def validate(self, at) -> None:
        super().validate(at)
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r}", where=at("kind"), fix=f"use one of: {', '.join(KINDS)}")
        if self.kind == "grpo" and not self.grpo.rewards:
            raise ConfigError("GRPO needs at least one reward function", where=at("grpo.rewards"),
                              fix='e.g. rewards: ["rewards.py:format_reward"]')
        if self.kind == "ppo" and not (self.ppo.rewards or self.ppo.reward_model):
            raise ConfigError(NO_PPO_REWARD, where=at("ppo.rewards"), fix=PPO_REWARD_FIX)

    def ds_config(self) -> dict:
        """DeepSpeed config for TRL's trainers ("auto" values are filled from the TrainingArguments).
        Saving never gathers the whole model: checkpoints stay ZeRO shards, which convert streams."""
        zero: dict = {"stage": self.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
        if self.zero_stage == 3:
            zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
        return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
