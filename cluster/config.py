"""cluster.yaml (where a job runs) and the job spec (what it runs), parsed and checked before
anything is rendered. Every error names the file, line, field and the fix."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from clusterctl.errors import ConfigError
from clusterctl.hostlist import expand_hostlist
from clusterctl.schema import load_yaml, parse, where_of
from clusterctl.training.config import BUILTIN_TINY_DATA, BUILTIN_TINY_MODEL, TrainConfig

BACKENDS = ("local", "ssh", "slurm")
STAGES = ("sft", "convert", "deploy")


@dataclass
class SshSettings:
    user: str = ""
    port: int = 22
    identity_file: str = ""
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str = ""                    # an OpenSSH client config to resolve host aliases
    insecure_accept_unknown_hosts: bool = False
    connect_timeout: float = 10.0


@dataclass
class SlurmSettings:
    partition: str = ""
    account: str = ""
    time: str = ""                          # sbatch --time; "" = the partition's default
    signal_seconds: int = 300               # USR2 this long before the time limit: checkpoint + requeue
    max_restarts: int = 3
    extra_options: dict[str, str] = field(default_factory=dict)


@dataclass
class Ports:
    master: int = 0                         # torch.distributed rendezvous; 0 = derived from the run id
    ray: int = 6379
    ray_dashboard: int = 8265
    vllm: int = 8000


@dataclass
class ClusterConfig:
    backend: str = "local"
    hosts: list[str] = field(default_factory=list)   # ssh: pdsh host lists accepted ("node[01-32]")
    gpus_per_node: int = 0                           # 0: CPU-only nodes (one process per node)
    gpu_memory_gib: float = 80.0
    host_memory_gib: float = 0.0                     # 0: unknown (the planner skips the host check)
    python: str = ""                                 # the node-side interpreter; "" = this one
    runs_dir: str = ""                               # shared folder visible from every node
    interface: str = ""                              # NIC for NCCL/Gloo/Ray (e.g. ib0, eth0)
    ray_temp_dir: str = "/tmp/ray"
    swap_dir: str = ""                               # where convert may create a swap file
    env: dict[str, str] = field(default_factory=dict)          # exported on every node (NCCL_*, ...)
    setup: dict[str, list[str]] = field(default_factory=dict)  # shell lines per stage, or "all"
    ports: Ports = field(default_factory=Ports)
    ssh: SshSettings = field(default_factory=SshSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    source: str = "(built-in local cluster)"

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node or 1

    @property
    def python_path(self) -> str:
        return self.python or sys.executable


@dataclass
class ConvertSpec:
    nodes: int = 1
    dtype: str = "bf16"
    verify: bool = True
    workers: int = 1
    engine: str = ""                        # "" = follow sft.engine


@dataclass
class DeploySpec:
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


@dataclass
class JobSpec:
    name: str = "sft"
    model: str = BUILTIN_TINY_MODEL
    data: str = BUILTIN_TINY_DATA
    engine: str = "clusterctl"              # or "xtuner" (the original recipe's environment)
    sft: dict = field(default_factory=dict)  # TrainConfig fields + nodes
    convert: ConvertSpec = field(default_factory=ConvertSpec)
    deploy: DeploySpec = field(default_factory=DeploySpec)
    source: str = "(built-in tiny job)"
    sft_nodes: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)

    def nodes(self, stage: str) -> int:
        return {"sft": self.sft_nodes, "convert": self.convert.nodes, "deploy": self.deploy.nodes}[stage]


def load_cluster(path: str | None) -> ClusterConfig:
    """cluster.yaml, or the built-in local cluster when no file is given."""
    if path is None:
        return ClusterConfig()
    values = load_yaml(path)
    config = parse(ClusterConfig, values, str(path), internal=("source",))
    config.source = str(Path(path).resolve())
    at = lambda name: where_of(values, name, str(path))  # noqa: E731
    if config.backend not in BACKENDS:
        raise ConfigError(f"unknown backend {config.backend!r}", where=at("backend"),
                          fix=f"use one of: {', '.join(BACKENDS)}")
    config.hosts = [h for entry in config.hosts for h in expand_hostlist(entry, where=at("hosts"))]
    if config.backend == "ssh" and not config.hosts:
        raise ConfigError("the ssh backend needs hosts", where=at("hosts"),
                          fix="list them, e.g. hosts: [\"node[01-32]\"]")
    for stage in config.setup:
        if stage not in STAGES + ("all",):
            raise ConfigError(f"unknown stage {stage!r}", where=at(f"setup.{stage}"),
                              fix=f"use one of: all, {', '.join(STAGES)}")
    for name, value in config.env.items():
        if not name.isidentifier():
            raise ConfigError(f"{name!r} is not a valid environment variable name", where=at(f"env.{name}"))
    for stage, lines in config.setup.items():
        for line in lines:
            if "\n" in line:
                raise ConfigError("one shell line per list item (no newlines)", where=at(f"setup.{stage}"))
    return config


def builtin_job_path(name: str) -> Path:
    return Path(str(resources.files("clusterctl") / "examples" / f"{name}.yaml"))


def load_job(path: str | None, *, sft_nodes: int | None, cluster: ClusterConfig,
             check_paths: bool = True) -> JobSpec:
    """A job spec (or the built-in tiny job), checked against the cluster it will run on."""
    source = Path(path) if path else builtin_job_path("tiny-job")
    if path and not source.exists() and builtin_job_path(path).exists():
        source = builtin_job_path(path)   # a built-in example by name, e.g. --job deepseek-r1-671b-job
    values = load_yaml(source)
    at = lambda name: where_of(values, name, str(source))  # noqa: E731
    job = parse(JobSpec, values, str(source), internal=("source", "train", "sft_nodes"))
    job.source = str(source.resolve())
    sft = dict(job.sft)
    nodes = sft.pop("nodes", 1)
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ConfigError(f"expected a node count of at least 1, got {nodes!r}", where=at("sft.nodes"))
    job.sft_nodes = sft_nodes or nodes
    for key in ("model", "data", "output_dir", "metrics_file", "tensorboard_dir"):
        if key in sft:
            raise ConfigError(f"{key} is not set per stage", where=at(f"sft.{key}"),
                              fix="set model and data at the top level; outputs live in the run folder")
    sft_values = type(values)(sft)
    sft_values.lines = getattr(values, "lines", {})
    job.train = TrainConfig.from_dict(sft_values, where=str(source), prefix="sft.")
    if job.engine not in ("clusterctl", "xtuner"):
        raise ConfigError(f"unknown engine {job.engine!r}", where=at("engine"), fix="use clusterctl or xtuner")
    if job.convert.dtype not in ("bf16", "fp32", "fp16"):
        raise ConfigError(f"unknown dtype {job.convert.dtype!r}", where=at("convert.dtype"),
                          fix="use bf16, fp16 or fp32")
    for stage in STAGES:
        _check_nodes(job.nodes(stage), stage, cluster, at(f"{stage}.nodes"))
    _check_parallelism(job, cluster, at)
    if check_paths:
        _check_input_paths(job, source, at)
    _check_deploy_parallelism(job, cluster, at)
    return job


def _check_nodes(nodes: int, stage: str, cluster: ClusterConfig, where: str) -> None:
    if nodes < 1:
        raise ConfigError("a stage needs at least 1 node", where=where)
    if cluster.backend == "ssh" and nodes > len(cluster.hosts):
        raise ConfigError(f"{stage} asks for {nodes} nodes but {cluster.source} lists {len(cluster.hosts)} hosts",
                          where=where, fix="add hosts to cluster.yaml or lower the node count (--nodes)")


def _check_parallelism(job: JobSpec, cluster: ClusterConfig, at) -> None:
    world = job.sft_nodes * cluster.procs_per_node
    if world % job.train.sequence_parallel:
        raise ConfigError(f"sequence_parallel {job.train.sequence_parallel} does not divide the "
                          f"world size {world} ({job.sft_nodes} nodes x {cluster.procs_per_node})",
                          where=at("sft.sequence_parallel"), fix="pick a divisor of the world size")


def _check_deploy_parallelism(job: JobSpec, cluster: ClusterConfig, at) -> None:
    """tp must divide the attention heads, pp at most the layers: vLLM would fail late or hang."""
    from clusterctl.deploy.vllm_args import check_parallel, read_model_config, resolve_parallel

    tp, pp = resolve_parallel(job.deploy.tensor_parallel, job.deploy.pipeline_parallel,
                              gpus_per_node=cluster.gpus_per_node, nodes=job.deploy.nodes)
    model_config = None if job.model.startswith("builtin:") else read_model_config(job.model)
    check_parallel(tp, pp, gpus_per_node=cluster.gpus_per_node, nodes=job.deploy.nodes,
                   model_config=model_config, where=lambda field: at(f"deploy.{field}"))


def _check_input_paths(job: JobSpec, source: Path, at) -> None:
    for key in ("model", "data"):
        value = getattr(job, key)
        if value.startswith("builtin:"):
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = source.parent / path
        if not path.exists():
            raise ConfigError(f"{path} does not exist", where=at(key),
                              fix=f"point {key} at an existing {'model folder' if key == 'model' else 'data file'}"
                                  " (relative paths are taken from the job spec's folder)")
        setattr(job, key, str(path.resolve()))
