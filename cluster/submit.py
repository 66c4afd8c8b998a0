"""Render a run folder and hand its stages to a backend: one code path for --dry-run and real runs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from clusterctl.backends.base import backend_for
from clusterctl.config import STAGES, TRAIN_STAGES, ClusterConfig, JobSpec, load_cluster, load_job
from clusterctl.errors import UserError
from clusterctl.publish import publish_run
from clusterctl.render import render_run, stage_io
from clusterctl.rlspec import EXAMPLE_JOBS
from clusterctl.run import Run, default_runs_dir, master_port_for, new_run_id
from clusterctl.schema import dump, parse_assignment


def parse_stages(text: str, order: tuple[str, ...] = STAGES) -> list[str]:
    """'sft,convert' -> ['sft', 'convert']; stages must be consecutive in `order` (sft -> convert -> deploy,
    or grpo/dpo/simpo -> convert -> deploy)."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in order]
    if unknown or not stages:
        raise UserError(f"unknown stage(s) {', '.join(unknown) or text!r}", where="--stages",
                        fix=f"use a comma-separated run of {' -> '.join(order)}, e.g. {order[0]},convert")
    start = order.index(stages[0])
    if stages != list(order[start:start + len(stages)]):
        raise UserError(f"stages {text!r} are not consecutive", where="--stages",
                        fix="each stage reads the previous one's output: e.g. sft,convert or convert,deploy")
    return stages


def runs_root(runs_dir: str | None, cluster: ClusterConfig) -> Path:
    return Path(runs_dir or cluster.runs_dir or default_runs_dir())


def create_run(*, stages: list[str], cluster: ClusterConfig, job: JobSpec, runs_dir: Path,
               overrides: dict | None = None, dry_run: bool = False, settings: dict | None = None) -> Run:
    """Render every stage of a new run folder and, unless dry_run, submit the chain."""
    backend = backend_for(cluster)
    run = Run(runs_dir / new_run_id())
    while run.dir.exists():
        run = Run(runs_dir / new_run_id())
    port = cluster.ports.master or master_port_for(run.id)
    overrides = overrides or {}
    from clusterctl.deploy.adapters import resolve_runs  # deploy.adapters' run:<RUN> -> checked adapter folders
    resolve_runs(job, stages=stages, model=overrides.get("model"), runs_dir=runs_dir)
    files = render_run(run, stages, cluster=cluster, job=job, backend=backend, master_port=port,
                       overrides=overrides)
    files["run.json"] = json.dumps({
        "run": run.id, "created": time.time(), "backend": cluster.backend, "dry_run": dry_run,
        "master_port": port, "chain": stages,
        "cluster": cluster_snapshot(cluster), "job": job_snapshot(job), "overrides": overrides,
        "set": {flag: list(values) for flag, values in (settings or {}).items() if values},
        "node_python": cluster.describe_node_python(),
        "sources": {"cluster": cluster.source, "job": job.source},
        "stages": {stage: {"state": "PENDING", "nodes": job.nodes(stage),
                           "hosts": backend.hosts(job.nodes(stage)),
                           **_outputs(run, stage, overrides, job.kind)} for stage in stages},
    }, indent=2) + "\n"
    files["cluster.yaml"] = yaml.safe_dump(cluster_snapshot(cluster), sort_keys=False)
    files["job.yaml"] = yaml.safe_dump(job_snapshot(job), sort_keys=False)
    publish_run(run, files)
    if not dry_run:
        backend.submit(run, stages)
    return run


def cluster_snapshot(cluster: ClusterConfig) -> dict:
    return dump(cluster)


def job_snapshot(job: JobSpec) -> dict:
    """The job as resolved (paths absolute, overrides applied), in job-spec form so it loads back."""
    return dump(job)


def _outputs(run: Run, stage: str, overrides: dict, train_stage: str = "sft") -> dict:
    """What run.json records of a stage's output before it runs (the deploy endpoint comes later)."""
    if stage == "deploy":
        return {"endpoint": ""}
    (output,) = stage_io(run, stage, overrides, train_stage)[1].values()
    return {"output": output}


def check_memory(job: JobSpec, cluster: ClusterConfig) -> None:
    """Refuse an SFT job that cannot fit the cluster's GPU (or known host) memory: the planner's
    verdict and its smallest fix, before hours are spent in a queue. CPU-only clusters skip it."""
    if not cluster.gpus_per_node or job.engine != "clusterctl":
        return
    from clusterctl.plan import GIB, Setup, load_shape, plan, suggest

    t = job.sft
    setup = Setup(nodes=t.nodes, gpus_per_node=cluster.gpus_per_node, sp=t.sequence_parallel,
                  zero=t.zero_stage, offload_optimizer=t.offload_optimizer, offload_param=t.offload_param,
                  micro_batch=t.micro_batch, seq_len=t.max_length, gradient_checkpointing=t.gradient_checkpointing,
                  gpu_memory_gib=cluster.gpu_memory_gib, host_memory_gib=cluster.host_memory_gib or float("inf"),
                  method=t.method, lora_rank=t.lora.rank, expert_groups=t.expert_groups)
    shape = load_shape(job.model)
    result = plan(shape, setup)
    if result.fits:
        return
    where = ("GPU", result.gpu_total, setup.gpu_memory_gib) if not result.fits_gpu else \
        ("host RAM", result.host_total, setup.host_memory_gib)
    fix = suggest(shape, setup)
    raise UserError(f"the SFT job needs {where[1] / GIB:.1f} GiB of {where[0]} per "
                    f"{'GPU' if where[0] == 'GPU' else 'node'} but has {where[2]:g} GiB",
                    where=job.source,
                    fix=(f"{_spec_change(setup, fix[1].setup)} (then {fix[1].gpu_total / GIB:.1f} GiB per GPU); "
                         if fix else "") + "see `clusterctl plan`, or pass --force to submit anyway")


# The planner's Setup fields and the job-spec fields they come from.
_SPEC_FIELDS = {"nodes": "sft.nodes", "sp": "sft.sequence_parallel", "zero": "sft.zero_stage",
                "offload_optimizer": "sft.offload_optimizer", "offload_param": "sft.offload_param",
                "micro_batch": "sft.micro_batch"}


def _spec_change(before, after) -> str:
    """The planner's fix in job-spec terms: `set sft.sequence_parallel: 8 (or --set sft.sequence_parallel=8)`."""
    changes = {_SPEC_FIELDS[name]: getattr(after, name) for name in _SPEC_FIELDS
               if getattr(after, name) != getattr(before, name)}
    values = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in changes.items()}
    return (f"set {', '.join(f'{key}: {value}' for key, value in values.items())} in the job spec (or "
            f"{' '.join(f'--set {key}={value}' for key, value in values.items())})")


def submit(*, first_stage: str, stages_text: str | None, sft_nodes: int | None, cluster_file: str | None,
           job_file: str | None, runs_dir: str | None, dry_run: bool, force: bool = False,
           job_set: tuple[str, ...] = (), cluster_set: tuple[str, ...] = ()) -> Run:
    kind = first_stage if first_stage in TRAIN_STAGES else "sft"
    order = (kind, "convert", "deploy")
    stages = parse_stages(stages_text, order) if stages_text else list(order[order.index(first_stage):])
    cluster = load_cluster(cluster_file, assignments(cluster_set, "--set-cluster"))
    job_overrides = assignments(job_set, "--set")
    if kind != "sft":   # `submit grpo|dpo|simpo`: that kind's section, its built-in example without --job
        job_overrides = [("kind", kind, f"submit {kind}"), *job_overrides,
                         *([(f"{kind}.nodes", sft_nodes, f"--nodes {sft_nodes}")] if sft_nodes else [])]
        job_file, sft_nodes = job_file or EXAMPLE_JOBS[kind], None
    job = load_job(job_file, cluster=cluster, overrides=job_overrides, sft_nodes=sft_nodes,
                   check_paths=kind in stages)
    if job.kind != kind:
        raise UserError(f"{job.source} is a {job.kind} job", where="kind",
                        fix=f"submit it with `clusterctl submit {job.kind}`")
    if "sft" in stages and not force:
        check_memory(job, cluster)
    return create_run(stages=stages, cluster=cluster, job=job, runs_dir=runs_root(runs_dir, cluster),
                      dry_run=dry_run, settings={"--set": job_set, "--set-cluster": cluster_set})


def assignments(texts: tuple[str, ...], flag: str) -> list:
    """`--set a.b=c` texts as (path, value, origin) overrides for load_job / load_cluster."""
    return [parse_assignment(text, flag) for text in texts]


def submit_stage_alone(stage: str, *, base_run: str | None, runs_dir: str | None, cluster_file: str | None,
                       job_file: str | None, overrides: dict, nodes: int | None = None,
                       job_set: tuple[str, ...] = (), cluster_set: tuple[str, ...] = (),
                       job_flags: tuple = ()) -> Run:
    """`clusterctl convert` / `deploy`: one stage in a new run, fed by an earlier run or a given path.

    Without --checkpoint/--model the input is the output of the named (or newest) run, and the
    cluster and job settings default to that run's snapshot. --nodes and --set apply before the
    job is checked against the cluster."""
    from clusterctl.run import find_run

    given_input = overrides.get("checkpoint") or overrides.get("model")
    base = None
    if base_run or not given_input:
        base = find_run(runs_dir, base_run)
        data = base.read()
        train_stage = next((s for s in data["chain"] if s in TRAIN_STAGES), "sft")
        stage_input = {"convert": ("checkpoint", train_stage), "deploy": ("model", "convert")}[stage]
        previous = data["stages"].get(stage_input[1])
        if not given_input:
            if not previous or previous.get("state") != "COMPLETED":
                raise UserError(f"run {base.id} has no completed {stage_input[1]} stage to {stage}",
                                fix=f"pass --{stage_input[0]} DIR, or name a run whose {stage_input[1]} completed")
            overrides[stage_input[0]] = previous["output"]
        cluster_file = cluster_file or str(base.dir / "cluster.yaml")
        job_file = job_file or str(base.dir / "job.yaml")
    cluster = load_cluster(cluster_file, assignments(cluster_set, "--set-cluster"))
    job_overrides = assignments(job_set, "--set") + list(job_flags) + (
        [(f"{stage}.nodes", nodes, f"--nodes {nodes}")] if nodes else [])
    job = load_job(job_file, cluster=cluster, overrides=job_overrides, check_paths=False)
    for key in ("checkpoint", "model"):
        if overrides.get(key) and not Path(overrides[key]).exists():
            raise UserError(f"{overrides[key]} does not exist", where=f"--{key}", fix="check the path")
    return create_run(stages=[stage], cluster=cluster, job=job, runs_dir=runs_root(runs_dir, cluster),
                      overrides=overrides, settings={"--set": job_set, "--set-cluster": cluster_set})
