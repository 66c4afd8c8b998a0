"""The job spec (what runs): one typed, validated class per section, held by JobSpec.

Each section is a dataclass that `clusterctl.schema.parse` builds from its own YAML mapping (unknown
keys and wrong types refused by name, with file and line), then checks itself in `validate(at)`.
A section that runs as a stage (StageSection) also checks itself against the cluster it will run on
in `check_cluster(name, job, cluster, at)`. Adding a job kind = one more section class and one field
on JobSpec (CONTRACTS.md, "Adding a job-spec field or a job kind")."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from clusterctl import modelconfig
from clusterctl.errors import ConfigError
from clusterctl.training.config import BUILTIN_TINY_DATA, BUILTIN_TINY_MODEL, TrainConfig
from clusterctl.training.evaluation import EvalGate

if TYPE_CHECKING:
    from clusterctl.config import ClusterConfig

At = Callable[[str], str]   # field name -> "file:line: section.field", for error messages
ENGINES = ("clusterctl", "xtuner")


def check_line(value: str, at: At, name: str) -> None:
    """Refuse a newline (or NUL) in a value that lands on one line: a header, a comment, an option."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise ConfigError(f"{name} must be one line (it holds a newline or NUL)", where=at(name),
                          fix="remove the line break")


class StageSection:
    """A job-spec section that runs as a stage on `nodes` nodes (mixed into a section dataclass)."""

    nodes: int

    def validate(self, at: At) -> None:
        if self.nodes < 1:
            raise ConfigError(f"a stage needs at least 1 node, got {self.nodes}", where=at("nodes"))

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        """Checks against the cluster the stage runs on; `at(field)` names a field of this section."""
        if cluster.backend == "ssh" and self.nodes > len(cluster.hosts):
            raise ConfigError(f"{name} asks for {self.nodes} nodes but {cluster.source} lists "
                              f"{len(cluster.hosts)} hosts", where=at("nodes"),
                              fix="add hosts to cluster.yaml or lower the node count (--nodes)")


@dataclass
class SftSpec(TrainConfig, StageSection):
    """`sft:` — the trainer's settings (TrainConfig, shared with the node side) plus the node count.
    The per-run fields of TrainConfig come from the job's top level and the run folder."""

    INTERNAL: ClassVar[tuple[str, ...]] = ("model", "data", "output_dir", "metrics_file", "tensorboard_dir")
    INTERNAL_FIX: ClassVar[str] = "set model and data at the top level; outputs live in the run folder"
    nodes: int = 1

    def validate(self, at: At) -> None:
        TrainConfig.validate(self, at)
        StageSection.validate(self, at)

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        StageSection.check_cluster(self, name, job, cluster, at)
        world = self.nodes * cluster.procs_per_node
        if world % self.sequence_parallel:
            raise ConfigError(f"sequence_parallel {self.sequence_parallel} does not divide the world size {world} "
                              f"({self.nodes} nodes x {cluster.procs_per_node})", where=at("sequence_parallel"),
                              fix="pick a divisor of the world size")
        heads = attention_heads(job.model)
        if heads and heads % self.sequence_parallel:
            raise ConfigError(f"sequence_parallel {self.sequence_parallel} does not divide the model's {heads} "
                              "attention heads (Ulysses splits the heads across ranks)", where=at("sequence_parallel"),
                              fix=f"use one of {[d for d in range(1, heads + 1) if heads % d == 0]}")

    def train_config(self, *, model: str, data: str, stage_dir: Path) -> TrainConfig:
        """train.json for a run: these settings, the job's model and data, outputs in the stage folder."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**values, "model": model, "data": data, "output_dir": str(stage_dir / "checkpoints"),
                              "metrics_file": str(stage_dir / "metrics.jsonl"),
                              "tensorboard_dir": str(stage_dir / "tensorboard")})


@dataclass
class ConvertSpec(StageSection):
    """`convert:` — checkpoint to Hugging Face safetensors."""

    nodes: int = 1
    dtype: str = "bf16"
    verify: bool = True
    workers: int = 1
    engine: str = ""                        # "" = follow the job's engine

    def validate(self, at: At) -> None:
        super().validate(at)
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown dtype {self.dtype!r}", where=at("dtype"), fix="use bf16, fp16 or fp32")
        if self.engine not in ("",) + ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}", where=at("engine"),
                              fix=f"use one of: {', '.join(ENGINES)} (or leave it out to follow the job's engine)")
        if self.workers < 1:
            raise ConfigError(f"must be at least 1, got {self.workers}", where=at("workers"))


@dataclass
class DeploySpec(StageSection):
    """`deploy:` — Ray + vLLM serving."""

    INTERNAL: ClassVar[tuple[str, ...]] = ("adapters_at",)
    nodes: int = 1
    tensor_parallel: int = 0                # 0 = GPUs per node
    pipeline_parallel: int = 0              # 0 = nodes
    served_model_name: str = ""
    max_model_len: int = 0                  # 0 = the model's own limit
    api_key_file: str = ""                  # read on the node at run time; never rendered
    reasoning_parser: str = "deepseek_r1"
    extra_args: list[str] = field(default_factory=list)
    ready_timeout: int = 1800
    host: str = "0.0.0.0"
    trust_remote_code: bool = False
    gate: EvalGate = field(default_factory=EvalGate)   # serve only a model whose eval loss passes
    lora: str = "merged"                    # LoRA runs: merged | adapters (the base + this run's adapter by name)
    engine: str = "vllm"                    # vllm | llamacpp (llama-server, one node, the model as GGUF)
    gguf_type: str = "f16"                  # engine llamacpp: the GGUF served (exported on the node if missing)
    adapters: list[str] = field(default_factory=list)  # lora: adapters: more NAME=PATH / [NAME=]run:<RUN> beside it
    adapters_at: str = ""                   # where adapters was set ("job.yaml:7: deploy.adapters", "--adapter ...")

    def validate(self, at: At) -> None:
        super().validate(at)
        from clusterctl.deploy.adapters import Adapter

        if self.lora not in ("merged", "adapters"):
            raise ConfigError(f"unknown value {self.lora!r}", where=at("lora"), fix="use merged or adapters")
        from clusterctl.deploy.llamacpp import check_spec

        check_spec(self, at)
        self.adapters_at = at("adapters")   # run:<RUN> entries are resolved at submit (deploy.adapters.resolve_runs)
        for text in self.adapters:
            check_line(text, at, "adapters")
            Adapter.parse(text, where=at("adapters"))
        if self.adapters and self.lora != "adapters":
            raise ConfigError("adapters are served only with lora: adapters", where=at("adapters"),
                              fix="set deploy.lora: adapters, or remove deploy.adapters")
        for name in ("tensor_parallel", "pipeline_parallel", "max_model_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must not be negative, got {getattr(self, name)} (0 = the default)", where=at(name))
        if self.ready_timeout < 1:
            raise ConfigError(f"must be at least 1 second, got {self.ready_timeout}", where=at("ready_timeout"))
        for name in ("served_model_name", "api_key_file", "reasoning_parser", "host"):
            check_line(getattr(self, name), at, name)
        from clusterctl.deploy.vllm_args import has_api_key

        if has_api_key(self.extra_args):
            raise ConfigError("an API key on the command line is visible to every user of the node (and would be "
                              "written into the run folder)", where=at("extra_args"),
                              fix="put the key in a file and set deploy.api_key_file")

    def check_cluster(self, name: str, job: JobSpec, cluster: ClusterConfig, at: At) -> None:
        """tp must divide the attention heads, pp at most the layers: vLLM would fail late or hang."""
        from clusterctl.deploy.vllm_args import check_parallel, resolve_parallel

        super().check_cluster(name, job, cluster, at)
        self.gate.check_job(job.sft, at)
        if self.engine == "llamacpp":
            return   # one llama-server process: no vLLM parallelism or adapters to check (check_spec)
        if self.lora == "adapters":
            from clusterctl.deploy.adapters import Adapter, check

            if job.sft.method == "full" and not self.adapters:
                raise ConfigError("lora: adapters needs a LoRA run", where=at("lora"),
                                  fix="set sft.method: lora (or qlora), or deploy.lora: merged")
            check([Adapter(self.served_model_name or "lora", "")] + [Adapter.parse(a) for a in self.adapters],
                  model_config=model_config(job.model) or {}, gpus_per_node=cluster.gpus_per_node,
                  where=at("lora"))
        tp, pp = resolve_parallel(self.tensor_parallel, self.pipeline_parallel,
                                  gpus_per_node=cluster.gpus_per_node, nodes=self.nodes)
        try:
            check_parallel(tp, pp, gpus_per_node=cluster.gpus_per_node, nodes=self.nodes,
                           model_config=model_config(job.model), where=at)
        except ConfigError as error:
            defaults = {"tensor_parallel": f"GPUs per node ({tp})", "pipeline_parallel": f"the node count ({pp})"}
            unset = [f"{name} defaults to {value}" for name, value in defaults.items()
                     if not getattr(self, name) and at(name) in str(error)]
            if not unset:
                raise
            raise ConfigError(f"{error}\n  (not set in the job spec: {'; '.join(unset)})") from None


# The RL / preference kinds' sections (grpo:, dpo:, simpo:) live in a module of their own; it needs StageSection.
from clusterctl.rlspec import RL_KINDS, DpoSpec, GrpoSpec, PpoSpec, SimpoSpec  # noqa: E402

KINDS = ("sft",) + RL_KINDS


@dataclass
class JobSpec:
    """The whole job spec: top-level inputs and one section per stage."""

    INTERNAL: ClassVar[tuple[str, ...]] = ("source",)
    name: str = "sft"
    model: str = BUILTIN_TINY_MODEL
    data: str = BUILTIN_TINY_DATA
    engine: str = "clusterctl"              # or "xtuner" (the original recipe's environment)
    kind: str = "sft"                       # the training stage: sft, grpo, dpo or simpo (its own section below)
    sft: SftSpec = field(default_factory=SftSpec)
    grpo: GrpoSpec = field(default_factory=GrpoSpec)
    dpo: DpoSpec = field(default_factory=DpoSpec)
    simpo: SimpoSpec = field(default_factory=SimpoSpec)
    ppo: PpoSpec = field(default_factory=PpoSpec)
    convert: ConvertSpec = field(default_factory=ConvertSpec)
    deploy: DeploySpec = field(default_factory=DeploySpec)
    source: str = "(built-in tiny job)"

    def validate(self, at: At) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}", where=at("engine"), fix=f"use {' or '.join(ENGINES)}")
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r}", where=at("kind"), fix=f"use one of: {', '.join(KINDS)}")
        if self.kind != "sft" and self.engine != "clusterctl":
            raise ConfigError(f"engine {self.engine} trains only sft", where=at("engine"), fix="use engine: clusterctl")
        for name in ("name", "model", "data"):
            check_line(getattr(self, name), at, name)
        if not self.name.strip():
            raise ConfigError("the job needs a name", where=at("name"))

    def stages(self) -> dict[str, StageSection]:
        """The sections that run as stages, by name (the JobSpec fields whose class is a StageSection)."""
        return {f.name: value for f in dataclasses.fields(self)
                if isinstance(value := getattr(self, f.name), StageSection)}

    def nodes(self, stage: str) -> int:
        return self.stages()[stage].nodes

    def check_cluster(self, cluster: ClusterConfig, at: At) -> None:
        """Every stage section against the cluster; `at(dotted_field)` names a field of the job file."""
        for name, section in self.stages().items():
            section.check_cluster(name, self, cluster, _within(at, name))


def _within(at: At, section: str) -> At:
    """`at` for the fields of one section: field -> "file:line: section.field"."""
    return lambda field: at(f"{section}.{field}")


def model_config(model: str) -> dict | None:
    """The model's config.json as a mapping (the built-in model's shape too); None when the folder
    is not there yet (a later stage's input, checked again on the node)."""
    if model == BUILTIN_TINY_MODEL:
        from clusterctl.training.tiny import MODEL_SHAPE
        return dict(MODEL_SHAPE)
    from clusterctl.deploy.vllm_args import read_model_config
    return read_model_config(Path(model).expanduser())


def attention_heads(model: str) -> int:
    """The model's attention head count, or 0 when unknown (no config yet, or none in it)."""
    config = model_config(model)
    if not config:
        return 0
    where = f"{model}/config.json"
    return modelconfig.count(modelconfig.text_config(config, where), "num_attention_heads", where, default=0)
