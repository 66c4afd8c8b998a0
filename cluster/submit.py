"""Render a run folder and hand its stages to a backend: one code path for --dry-run and real runs."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml

from clusterctl.backends.base import backend_for
from clusterctl.config import STAGES, ClusterConfig, JobSpec, load_cluster, load_job
from clusterctl.errors import UserError
from clusterctl.render import render_run, stage_io, write_files
from clusterctl.run import Run, default_runs_dir, master_port_for, new_run_id


def parse_stages(text: str) -> list[str]:
    """'sft,convert' -> ['sft', 'convert']; stages must be consecutive in sft -> convert -> deploy."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"unknown stage(s) {', '.join(unknown) or text!r}", where="--stages",
                        fix=f"use a comma-separated run of {' -> '.join(STAGES)}, e.g. sft,convert")
    start = STAGES.index(stages[0])
    if stages != list(STAGES[start:start + len(stages)]):
        raise UserError(f"stages {text!r} are not consecutive", where="--stages",
                        fix="each stage reads the previous one's output: e.g. sft,convert or convert,deploy")
    return stages


def runs_root(runs_dir: str | None, cluster: ClusterConfig) -> Path:
    return Path(runs_dir or cluster.runs_dir or default_runs_dir())


def create_run(*, stages: list[str], cluster: ClusterConfig, job: JobSpec, runs_dir: Path,
               overrides: dict | None = None, dry_run: bool = False) -> Run:
    """Render every stage of a new run folder and, unless dry_run, submit the chain."""
    backend = backend_for(cluster)
    run = Run(runs_dir / new_run_id())
    while run.dir.exists():
        run = Run(runs_dir / new_run_id())
    port = cluster.ports.master or master_port_for(run.id)
    overrides = overrides or {}
    files = render_run(run, stages, cluster=cluster, job=job, backend=backend, master_port=port,
                       overrides=overrides)
    run.dir.mkdir(parents=True)
    (run.dir / "logs").mkdir()
    run.write({
        "run": run.id, "created": time.time(), "backend": cluster.backend, "dry_run": dry_run,
        "master_port": port, "chain": stages,
        "cluster": cluster_snapshot(cluster), "job": job_snapshot(job), "overrides": overrides,
        "sources": {"cluster": cluster.source, "job": job.source},
        "stages": {stage: {"state": "PENDING", "nodes": job.nodes(stage),
                           "hosts": backend.hosts(job.nodes(stage)),
                           **_outputs(run, stage, overrides)} for stage in stages},
    })
    files["cluster.yaml"] = yaml.safe_dump(cluster_snapshot(cluster), sort_keys=False)
    files["job.yaml"] = yaml.safe_dump(job_snapshot(job), sort_keys=False)
    write_files(run, files)
    if not dry_run:
        backend.submit(run, stages)
    return run


def cluster_snapshot(cluster: ClusterConfig) -> dict:
    values = dataclasses.asdict(cluster)
    values.pop("source")
    return values


def job_snapshot(job: JobSpec) -> dict:
    """The job as resolved (paths absolute, --nodes applied), in job-spec form so it loads back."""
    values = dataclasses.asdict(job)
    for derived in ("source", "train", "sft_nodes"):
        values.pop(derived)
    train = dataclasses.asdict(job.train)
    for per_run in ("model", "data", "output_dir", "metrics_file", "tensorboard_dir"):
        train.pop(per_run)
    values["sft"] = {"nodes": job.sft_nodes, **train}
    return values


def _outputs(run: Run, stage: str, overrides: dict) -> dict:
    """What run.json records of a stage's output before it runs (the deploy endpoint comes later)."""
    if stage == "deploy":
        return {"endpoint": ""}
    (output,) = stage_io(run, stage, overrides)[1].values()
    return {"output": output}


def check_memory(job: JobSpec, cluster: ClusterConfig) -> None:
    """Refuse an SFT job that cannot fit the cluster's GPU (or known host) memory: the planner's
    verdict and its smallest fix, before hours are spent in a queue. CPU-only clusters skip it."""
    if not cluster.gpus_per_node or job.engine != "clusterctl":
        return
    from clusterctl.plan import GIB, Setup, load_shape, plan, suggest

    t = job.train
    setup = Setup(nodes=job.sft_nodes, gpus_per_node=cluster.gpus_per_node, sp=t.sequence_parallel,
                  zero=t.zero_stage, offload_optimizer=t.offload_optimizer, offload_param=t.offload_param,
                  micro_batch=t.micro_batch, seq_len=t.max_length, gradient_checkpointing=t.gradient_checkpointing,
                  gpu_memory_gib=cluster.gpu_memory_gib, host_memory_gib=cluster.host_memory_gib or float("inf"))
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
                    fix=(f"{fix[0]} (then {fix[1].gpu_total / GIB:.1f} GiB per GPU); " if fix else "")
                    + "see `clusterctl plan`, or pass --force to submit anyway")


def submit(*, first_stage: str, stages_text: str | None, sft_nodes: int | None, cluster_file: str | None,
           job_file: str | None, runs_dir: str | None, dry_run: bool, force: bool = False) -> Run:
    stages = parse_stages(stages_text) if stages_text else list(STAGES[STAGES.index(first_stage):])
    cluster = load_cluster(cluster_file)
    job = load_job(job_file, sft_nodes=sft_nodes, cluster=cluster, check_paths="sft" in stages)
    if "sft" in stages and not force:
        check_memory(job, cluster)
    return create_run(stages=stages, cluster=cluster, job=job, runs_dir=runs_root(runs_dir, cluster),
                      dry_run=dry_run)


def submit_stage_alone(stage: str, *, base_run: str | None, runs_dir: str | None, cluster_file: str | None,
                       job_file: str | None, overrides: dict, nodes: int | None = None) -> Run:
    """`clusterctl convert` / `deploy`: one stage in a new run, fed by an earlier run or a given path.

    Without --checkpoint/--model the input is the output of the named (or newest) run, and the
    cluster and job settings default to that run's snapshot."""
    from clusterctl.run import find_run

    given_input = overrides.get("checkpoint") or overrides.get("model")
    base = None
    if base_run or not given_input:
        base = find_run(runs_dir, base_run)
        data = base.read()
        stage_input = {"convert": ("checkpoint", "sft"), "deploy": ("model", "convert")}[stage]
        previous = data["stages"].get(stage_input[1])
        if not given_input:
            if not previous or previous.get("state") != "COMPLETED":
                raise UserError(f"run {base.id} has no completed {stage_input[1]} stage to {stage}",
                                fix=f"pass --{stage_input[0]} DIR, or name a run whose {stage_input[1]} completed")
            overrides[stage_input[0]] = previous["output"]
        cluster_file = cluster_file or str(base.dir / "cluster.yaml")
        job_file = job_file or str(base.dir / "job.yaml")
    cluster = load_cluster(cluster_file)
    job = load_job(job_file, sft_nodes=None, cluster=cluster, check_paths=False)
    if nodes:
        getattr(job, stage).nodes = nodes
    for key in ("checkpoint", "model"):
        if overrides.get(key) and not Path(overrides[key]).exists():
            raise UserError(f"{overrides[key]} does not exist", where=f"--{key}", fix="check the path")
    return create_run(stages=[stage], cluster=cluster, job=job, runs_dir=runs_root(runs_dir, cluster),
                      overrides=overrides)
