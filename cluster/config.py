"""cluster.yaml (where a job runs) and the job spec (what it runs), parsed and checked before
anything is rendered. Every error names the file, line, field and the fix.

Each section of cluster.yaml is a dataclass that checks itself (`validate(at)`, run by
`clusterctl.schema.parse`); the job spec's sections live in clusterctl.spec. Overrides from the
command line (`--set`, `--set-cluster`, `--nodes`) are written into the loaded values first, so
they get exactly the checks a file gets."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from clusterctl import chain
from clusterctl.errors import ConfigError
from clusterctl.hostlist import expand_hostlist
from clusterctl.schema import apply_overrides, empty_located, load_yaml, parse, where_of
from clusterctl.spec import ConvertSpec, DeploySpec, JobSpec, SftSpec, StageSection, check_line  # noqa: F401 (re-exported)

BACKENDS = ("local", "ssh", "slurm")
STAGES = ("sft", "convert", "deploy")
TRAIN_STAGES = ("sft", "grpo", "dpo", "simpo", "ppo")   # the first stage of a chain is the job's kind
Override = tuple[str, object, str]   # (dotted path, value, origin named in errors), see schema.parse_assignment
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_port(value: int, at, name: str, *, zero_ok: bool = False) -> None:
    if not (zero_ok and value == 0) and not 1 <= value <= 65535:
        raise ConfigError(f"port {value} is outside 1-65535", where=at(name),
                          fix="pick a free port between 1024 and 65535" + (" (or 0 for the default)" if zero_ok else ""))


@dataclass
class SshSettings:
    user: str = ""
    port: int = 22
    identity_file: str = ""
    known_hosts: str = "~/.ssh/known_hosts"
    ssh_config: str = ""                    # an OpenSSH client config to resolve host aliases
    insecure_accept_unknown_hosts: bool = False
    connect_timeout: float = 10.0
    max_restarts: int = 3                   # a training stage whose node crashed or hung is started again (restarts.py)

    def validate(self, at) -> None:
        _check_port(self.port, at, "port")
        if self.max_restarts < 0:
            raise ConfigError(f"must not be negative, got {self.max_restarts}", where=at("max_restarts"),
                              fix="0 turns automatic restarts off")
        if self.connect_timeout <= 0:
            raise ConfigError(f"must be above 0 seconds, got {self.connect_timeout}", where=at("connect_timeout"))
        for name in ("user", "identity_file", "known_hosts", "ssh_config"):
            check_line(getattr(self, name), at, name)
        if self.ssh_config and not os.path.isfile(os.path.expanduser(self.ssh_config)):
            raise ConfigError(f"no such file: {self.ssh_config}", where=at("ssh_config"),
                              fix="point ssh_config at an OpenSSH client config file, or leave it out")


@dataclass
class SlurmSettings:
    partition: str = ""
    account: str = ""
    time: str = ""                          # sbatch --time; "" = the partition's default
    signal_seconds: int = 300               # USR2 this long before the time limit: checkpoint + requeue
    max_restarts: int = 3                   # requeues after the time-limit warning, a crash or a hang
    extra_options: dict[str, str] = field(default_factory=dict)

    def validate(self, at) -> None:
        for name in ("signal_seconds", "max_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must not be negative, got {getattr(self, name)}", where=at(name))
        for name in ("partition", "account", "time"):
            check_line(getattr(self, name), at, name)
        for key, value in self.extra_options.items():
            check_line(f"{key}={value}", lambda _, key=key: at(f"extra_options.{key}"),  # type: ignore[misc]
                       "an extra option")


@dataclass
class Ports:
    master: int = 0                         # torch.distributed rendezvous; 0 = derived from the run id
    ray: int = 6379
    ray_dashboard: int = 8265
    vllm: int = 8000

    def validate(self, at) -> None:
        _check_port(self.master, at, "master", zero_ok=True)
        for name in ("ray", "ray_dashboard", "vllm"):
            _check_port(getattr(self, name), at, name)


@dataclass
class ClusterConfig:
    INTERNAL = ("source",)
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

    @property
    def node_python(self) -> str:
        """The interpreter baked into node scripts: `python:`, or this one on the local backend; ""
        on remote nodes without `python:` (their scripts take python3 from PATH after `setup:`)."""
        return self.python or (sys.executable if self.backend == "local" else "")

    def describe_node_python(self) -> str:
        if self.node_python:
            return self.node_python + ("" if self.python else " (this interpreter: the local backend)")
        return "python3 on each node's PATH after the setup: lines (no python: in cluster.yaml)"

    def validate(self, at) -> None:
        """Checks of the file on its own; expands host lists (each host once across all entries)."""
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}", where=at("backend"),
                              fix=f"use one of: {', '.join(BACKENDS)}")
        for name in ("gpus_per_node", "gpu_memory_gib", "host_memory_gib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must not be negative, got {getattr(self, name)}", where=at(name),
                                  fix="0 means none (CPU-only nodes) or unknown")
        self.hosts = expand_hostlist(",".join(self.hosts), where=at("hosts"))
        if self.backend == "ssh" and not self.hosts:
            raise ConfigError("the ssh backend needs hosts", where=at("hosts"),
                              fix="list them, e.g. hosts: [\"node[01-32]\"]")
        for stage, lines in self.setup.items():
            if stage not in STAGES + TRAIN_STAGES[1:] + ("all",):
                raise ConfigError(f"unknown stage {stage!r}", where=at(f"setup.{stage}"),
                                  fix=f"use one of: all, {', '.join(STAGES)}")
            if any("\n" in line or "\r" in line for line in lines):
                raise ConfigError("one shell line per list item (no newlines)", where=at(f"setup.{stage}"))
        for name in self.env:
            if not ENV_NAME.fullmatch(name):
                raise ConfigError(f"{name!r} is not a valid environment variable name", where=at(f"env.{name}"),
                                  fix="use letters, digits and _ (not starting with a digit)")
        for name in ("python", "runs_dir", "interface", "ray_temp_dir", "swap_dir"):
            check_line(getattr(self, name), at, name)


def load_cluster(path: str | None, overrides: Iterable[Override] = ()) -> ClusterConfig:
    """cluster.yaml (or the built-in local cluster when no file is given), with `--set-cluster`
    overrides written in before it is checked."""
    values = load_yaml(path) if path is not None else empty_located(ClusterConfig.source)
    config = parse(ClusterConfig, apply_overrides(values, overrides), str(path or ClusterConfig.source))
    if path is not None:
        config.source = str(Path(path).resolve())
    return config


def load_cluster_snapshot(path: Path) -> ClusterConfig:
    """A run folder's cluster.yaml. Submit writes every field, so a missing one means the file was
    cut short or edited: refused rather than silently filled with defaults."""
    values = load_yaml(path)
    missing = [f.name for f in fields(ClusterConfig) if f.name not in (*ClusterConfig.INTERNAL, *values)]
    if missing:
        raise ConfigError(f"the run's cluster snapshot is incomplete (no {', '.join(missing)})", where=str(path),
                          fix="restore it from the cluster.yaml the run was submitted with (every field is written)")
    config = parse(ClusterConfig, values, str(path))
    config.source = str(path)
    return config


def builtin_job_path(name: str) -> Path:
    return Path(str(resources.files("clusterctl") / "examples" / f"{name}.yaml"))


def load_job(path: str | None, *, cluster: ClusterConfig, overrides: Iterable[Override] = (),
             sft_nodes: int | None = None, check_paths: bool = True) -> JobSpec:
    """A job spec (or the built-in tiny job) with its overrides (`--set`; `sft_nodes` is submit's
    --nodes), checked on its own and against the cluster it will run on."""
    source = Path(path) if path else builtin_job_path("tiny-job")
    if path and not source.exists() and builtin_job_path(path).exists():
        source = builtin_job_path(path)   # a built-in example by name, e.g. --job deepseek-r1-671b-job
    overrides = list(overrides) + ([("sft.nodes", sft_nodes, f"--nodes {sft_nodes}")] if sft_nodes else [])
    values = apply_overrides(load_yaml(source), overrides)
    job = parse(JobSpec, values, str(source))
    job.source = str(source.resolve())
    at = lambda name: where_of(values, name, str(source))  # noqa: E731 (a one-line closure)
    if check_paths:
        _check_input_paths(job, source, at)
    job.check_cluster(cluster, at)
    return job


def _check_input_paths(job: JobSpec, source: Path, at) -> None:
    """The model must be a folder with config.json, the data a non-empty file (relative paths are
    taken from the job spec's folder)."""
    for key in ("model", "data"):
        value = getattr(job, key)
        if key == "model" and value.startswith(chain.PREFIX):   # an earlier run's converted model
            value = chain.resolve_run_model(value, at(key))
        if value.startswith("builtin:"):
            continue
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            path = source.parent / path
        wanted = "a Hugging Face model folder" if key == "model" else "a data file (JSONL)"
        fix = f"point {key} at {wanted} (relative paths are taken from the job spec's folder)"
        if not path.exists():
            raise ConfigError(f"{path} does not exist", where=at(key), fix=fix)
        if key == "model" and not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model folder: " + ("it has no config.json" if path.is_dir()
                              else "it is a file"), where=at(key), fix=fix)
        if key == "data" and not path.is_file():
            raise ConfigError(f"{path} is a folder, not a data file", where=at(key), fix=fix)
        if key == "data" and path.stat().st_size == 0:
            raise ConfigError(f"{path} is empty", where=at(key), fix=fix)
        setattr(job, key, str(path.resolve()))
