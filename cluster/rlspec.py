"""Job-spec sections of the RL and preference kinds: `grpo:`, `dpo:`, `simpo:`, `ppo:` (CONTRACTS.md, "Adding a
job-spec field or a job kind"). Each is the node side's settings (training/rl/config.py) plus `nodes`;
a section is checked against its data and reward files only when the job's `kind` names it.
Imported by clusterctl.spec; no torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.errors import ConfigError
from clusterctl.spec import At, StageSection
from clusterctl.training.rl.config import (
    NO_PPO_REWARD,
    PPO_REWARD_FIX,
    GrpoSettings,
    PpoSettings,
    PreferenceSettings,
    RLConfig,
    TrainSettings,
)

if TYPE_CHECKING:
    from clusterctl.config import ClusterConfig
    from clusterctl.spec import JobSpec

RL_KINDS: tuple[str, ...] = ("grpo", "dpo", "simpo", "ppo")
# The built-in example job of each kind, run when `submit KIND` gets no --job.
EXAMPLE_JOBS = {"grpo": "countdown-grpo", "dpo": "tiny-dpo", "simpo": "tiny-simpo", "ppo": "ppo-toy"}


class RLSection(StageSection):
    """What the three sections share: the per-kind settings object and the rank/batch checks."""

    SETTINGS: Any                       # the kind's settings class, whose fields this section also has

    def validate(self, at: At) -> None:
        TrainSettings.validate(self, at)  # type: ignore[arg-type]
        self.SETTINGS.validate(self, at)
        StageSection.validate(self, at)

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        if job.kind != name:
            return
        StageSection.check_cluster(self, name, job, cluster, at)
        self.check_data(job, at)

    def check_data(self, job: JobSpec, at: At) -> None:
        from clusterctl.training.rl.data import columns_of

        columns_of(job.data, job.kind, where=f"{job.source}: data")

    def rl_config(self, kind: str, *, model: str, data: str, stage_dir: Path) -> RLConfig:
        """train.json for a run: these settings, the job's model and data, outputs in the stage folder."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)}
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.SETTINGS)}
        section = kind if kind in ("grpo", "ppo") else "preference"
        return RLConfig(**common, kind=kind, model=model, data=data, output_dir=str(stage_dir / "checkpoints"),
                        metrics_file=str(stage_dir / "metrics.jsonl"), tensorboard_dir=str(stage_dir / "tensorboard"),
                        **{section: self.SETTINGS(**own)})


@dataclass
class GrpoSpec(RLSection, TrainSettings, GrpoSettings):
    """`grpo:` — GRPO with the user's reward functions (TRL GRPOTrainer)."""

    SETTINGS = GrpoSettings
    nodes: int = 1

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        if job.kind != name:
            return
        if not self.rewards:
            raise ConfigError("GRPO needs at least one reward function", where=at("rewards"),
                              fix='e.g. rewards: ["rewards.py:format_reward"] (a file beside the job spec)')
        super().check_cluster(name, job, cluster, at)
        world = self.nodes * cluster.procs_per_node
        rows = self.micro_batch * world * self.grad_accum
        if rows % self.num_generations:
            raise ConfigError(f"a generation batch of {rows} completions (micro_batch {self.micro_batch} x "
                              f"{world} ranks x grad_accum {self.grad_accum}) does not split into groups of "
                              f"num_generations {self.num_generations}", where=at("num_generations"),
                              fix="make micro_batch x ranks x grad_accum a multiple of num_generations")
        if self.rollout.engine == "trl-vllm" and not cluster.gpus_per_node:
            raise ConfigError("TRL's vLLM integration moves weights over NCCL: it needs GPUs",
                              where=at("rollout.engine"), fix="on CPU nodes use engine: vllm-server or transformers")
        if self.rollout.engine == "vllm-server" and not cluster.gpus_per_node and mla(job.model):
            raise ConfigError("vLLM's CPU build cannot reload MLA attention weights (DeepSeek-V2/V3) in place",
                              where=at("rollout.engine"), fix="on CPU nodes use engine: transformers for this model")

    def check_data(self, job: JobSpec, at: At) -> None:
        from clusterctl.training.rl.data import columns_of
        from clusterctl.training.rl.rewards import load_checked

        columns = columns_of(job.data, "grpo", where=f"{job.source}: data")
        base = Path(job.source).parent if Path(job.source).exists() else Path.cwd()
        self.rewards = [str(spec) for spec in load_checked(self.rewards, columns, base=base, where=at("rewards"))]


def mla(model: str) -> bool:
    """Whether the model uses multi-head latent attention (its config has kv_lora_rank)."""
    from clusterctl.spec import model_config

    return bool((model_config(model) or {}).get("kv_lora_rank"))


@dataclass
class DpoSpec(RLSection, TrainSettings, PreferenceSettings):
    """`dpo:` — Direct Preference Optimization (TRL DPOTrainer) on prompt/chosen/rejected pairs."""

    SETTINGS = PreferenceSettings
    nodes: int = 1


@dataclass
class SimpoSpec(RLSection, TrainSettings, PreferenceSettings):
    """`simpo:` — SimPO (TRL CPOTrainer, loss_type simpo, cpo_alpha 0): no reference model."""

    SETTINGS = PreferenceSettings
    nodes: int = 1


@dataclass
class PpoSpec(RLSection, TrainSettings, PpoSettings):
    """`ppo:` — PPO (training/rl/ppo.py): a reward model folder or the user's reward functions (checked as
    grpo's are), a critic, and a frozen reference copy of the actor."""

    SETTINGS = PpoSettings
    nodes: int = 1

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        if job.kind != name:
            return
        if not (self.rewards or self.reward_model):
            raise ConfigError(NO_PPO_REWARD, where=at("rewards"), fix=PPO_REWARD_FIX)
        if self.grad_accum != 1:
            raise ConfigError("PPO splits each rollout batch into num_mini_batches optimizer steps instead",
                              where=at("grad_accum"), fix="remove grad_accum; set num_mini_batches")
        if self.micro_batch * self.num_generations % self.num_mini_batches:
            raise ConfigError(f"a rollout batch of {self.micro_batch * self.num_generations} completions per rank "
                              f"(micro_batch x num_generations) does not split into {self.num_mini_batches} "
                              "mini-batches", where=at("num_mini_batches"), fix="use a divisor")
        self.reward_model = self._model_folder(job, "reward_model", at, classifier=True)
        self.value_model = self._model_folder(job, "value_model", at, classifier=False)
        super().check_cluster(name, job, cluster, at)

    def _model_folder(self, job: JobSpec, name: str, at: At, *, classifier: bool) -> str:
        """A reward/value model folder made absolute (relative to the job spec), with a config.json; the
        reward model must be a sequence classifier with one label (its score)."""
        import json

        value = getattr(self, name)
        if not value:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path(job.source).parent / path
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model folder (no config.json)", where=at(name),
                              fix="give a Hugging Face model folder (relative paths are taken from the job spec)")
        config = json.loads((path / "config.json").read_text())
        architectures = config.get("architectures") or []
        if classifier and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ConfigError(f"{path} is a {', '.join(architectures) or 'model of unknown architecture'}, not a "
                              "sequence classifier", where=at(name),
                              fix="a reward model is an ...ForSequenceClassification folder with num_labels 1")
        if classifier and len(config.get("id2label") or {0: ""}) != 1:
            raise ConfigError(f"{path} has {len(config['id2label'])} labels; a reward model scores with one",
                              where=at(name), fix="train the reward model with num_labels=1")
        return str(path.resolve())

    def check_data(self, job: JobSpec, at: At) -> None:
        from clusterctl.training.rl.data import columns_of
        from clusterctl.training.rl.rewards import load_checked

        columns = columns_of(job.data, "grpo", where=f"{job.source}: data")    # prompts, as grpo's
        base = Path(job.source).parent if Path(job.source).exists() else Path.cwd()
        self.rewards = [str(spec) for spec in load_checked(self.rewards, columns, base=base, where=at("rewards"))]
