"""GRPO on the Slurm test cluster through the CLI, killed hard and resumed: `clusterctl submit grpo` with a
user's reward file on 2 Slurm nodes (one rank each, gloo across the nodes' private interfaces); every
rank is killed with SIGKILL (no handler runs, nothing is saved) a few steps after the step-N checkpoint;
`clusterctl retry` resumes at step N+1 with the trainer's step, learning-rate schedule and Adam state
carried over and the lost steps' metrics replaced; the learnable toy reward's mean rises over the run;
`clusterctl plot` draws the reward curve. (One run for both, and no convert stage, which
tests/rl/test_pipeline.py runs: each trainer start costs 30-50 s on CI's 2 cores.)"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from fixtures.runs import logs_of, submit, write_cluster
from fixtures.slurm_cluster import SlurmCluster
from toy_job import ranks_of, read_metrics, write_job

from clusterctl.procs import processes_with_env
from clusterctl.training import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MAX_STEPS, SAVE_STEPS, LR = 12, 4, 3e-2
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def uninterrupted_lrs() -> list[float]:
    """Each step's learning rate in an uninterrupted run (transformers' linear schedule, no warmup)."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=MAX_STEPS)
    lrs = []
    for _ in range(MAX_STEPS):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return lrs


def kill_ranks_past_checkpoint(run_dir: Path, timeout: float = 600) -> int:
    """SIGKILL every rank once a checkpoint is complete and 2 steps past it are logged; the last logged step."""
    checkpoints, metrics = run_dir / "grpo" / "checkpoints", run_dir / "grpo" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tag = ckpt.latest_complete(checkpoints)
        logged = read_metrics(metrics) if tag and metrics.exists() else []
        if logged and logged[-1]["step"] >= ckpt.step_of(tag) + 2:
            ranks = ranks_of(run_dir)
            assert len(ranks) == 2, ranks
            for rank in ranks:
                rank.send_signal(signal.SIGKILL)
            return logged[-1]["step"]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint and 2 more steps within {timeout} s" + logs_of(run_dir))


def wait_finished(clusterctl, run_id: str, run_dir: Path, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stages = json.loads(clusterctl("status", run_id, "--json").stdout)["stages"]
        if all(s["state"] in FINISHED for s in stages.values()):
            return stages
        time.sleep(1)
    raise AssertionError(f"run not finished within {timeout} s" + logs_of(run_dir))


def test_grpo_on_two_slurm_nodes_killed_hard_resumes_and_learns(clusterctl, tmp_path, monkeypatch):
    with SlurmCluster(nodes=2, gpus_per_node=0) as slurm:
        monkeypatch.setenv("SLURM_CONF", slurm.conf)
        # no automatic restart (tests/backends/test_faults.py has those): the crash fails the stage, retry resumes it
        cluster = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "slurm": {
            "partition": slurm.partition, "time": "30:00", "max_restarts": 0}})
        job = write_job(tmp_path / "job", max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
        run_id, run_dir = submit(clusterctl, "grpo", "--stages", "grpo", "--cluster", cluster, "--job", job)
        checkpoints = run_dir / "grpo" / "checkpoints"
        try:
            last_logged = kill_ranks_past_checkpoint(run_dir)
            killed_at = time.time()
            resume_step = ckpt.step_of(ckpt.latest_complete(checkpoints))
            assert resume_step < last_logged < MAX_STEPS
            assert wait_finished(clusterctl, run_id, run_dir)["grpo"]["state"] == "FAILED"

            clusterctl("retry", run_id)
            stages = wait_finished(clusterctl, run_id, run_dir)
        finally:
            clusterctl("cancel", run_id, check=False)
    assert stages["grpo"]["state"] == "COMPLETED", logs_of(run_dir)
    logs = [(run_dir / "logs" / "grpo" / f"node-00{r}.log").read_text(errors="replace") for r in (0, 1)]
    hosts = {re.search(r"grpo node \d/2 on (\S+):", log).group(1) for log in logs}
    assert len(hosts) == 2, hosts                                           # two Slurm nodes
    assert f"resuming from {checkpoints / f'step-{resume_step}'} at step {resume_step}" in logs[0]

    metrics = read_metrics(run_dir / "grpo" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))        # no gap, no repeat
    assert all((m["time"] < killed_at) == (m["step"] <= resume_step) for m in metrics)   # lost steps redone
    assert [m["lr"] for m in metrics] == pytest.approx(uninterrupted_lrs(), rel=1e-6)   # the schedule resumed
    final = checkpoints / f"step-{MAX_STEPS}"
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    optim = torch.load(final / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    adam = optim["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    assert {float(s["step"]) for s in adam.values()} == {float(MAX_STEPS)}      # Adam's moments carried over
    marker = json.loads((final / "clusterctl-complete.json").read_text())
    assert marker["world_size"] == 2 and marker["kind"] == "grpo"

    rewards = [m["rewards/ids_divisible_by_4/mean"] for m in metrics]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert all(m["time/step"] >= m["time/rollout"] + m["time/reward"] > 0 for m in metrics)

    plotted = json.loads(clusterctl("plot", run_id, "--json").stdout)
    assert plotted["panels"]["reward"] == ["reward", "rewards/ids_divisible_by_4/mean"]
    assert plotted["series"]["rewards/ids_divisible_by_4/mean"]["values"] == rewards
    assert Path(plotted["png"]).read_bytes().startswith(b"\x89PNG")
    assert processes_with_env(f"RUN_DIR={run_dir}") == []
