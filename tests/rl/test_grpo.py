"""GRPO for real on the tiny model, 2 ranks under ZeRO-3 on gloo: a learnable reward rises; a run stopped
by SIGUSR2 saves, and the next run resumes at the same step; checkpoints are what convert streams."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from rl_run import base_env, command, read_metrics, run, toy_grpo

from clusterctl.convert.checkpoint import resolve
from clusterctl.training import checkpoint as ckpt
from clusterctl.training.rl import runner

pytestmark = pytest.mark.slow


def stop_after(config, step: int, timeout: float = 600) -> subprocess.CompletedProcess:
    """Start the run, send SIGUSR2 to its ranks once `step` is in the metrics, wait for it to end."""
    values = json.loads(config.read_text())
    proc = subprocess.Popen(command("grpo", config, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=base_env(), start_new_session=True)
    deadline = time.time() + timeout
    metrics = config.parent / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= step:
            for child in psutil.Process(proc.pid).children():
                child.send_signal(signal.SIGUSR2)
            break
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    assert values["output_dir"]
    return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")


def test_grpo_learns_a_toy_reward_and_resumes_at_the_same_step(tmp_path):
    config = toy_grpo(tmp_path / "job")
    stopped = stop_after(config, 3)
    preempted = json.loads((tmp_path / "job" / "checkpoints" / "preempted.json").read_text())
    stop_step = preempted["step"]
    assert 3 <= stop_step < 16, stopped.stdout[-3000:]
    assert runner.resume_point(tmp_path / "job" / "checkpoints", 2).endswith(f"step-{stop_step}")

    resumed = run("grpo", config)
    assert f"resuming from {tmp_path / 'job' / 'checkpoints' / f'step-{stop_step}'} at step {stop_step}" \
        in resumed.stdout + resumed.stderr
    metrics = read_metrics(tmp_path / "job" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 17))
    rewards = [m["rewards/ids_divisible_by_4/mean"] for m in metrics]
    assert all(m["reward"] == m["rewards/ids_divisible_by_4/mean"] for m in metrics)
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    for key in ("reward_std", "completions/mean_length", "entropy", "tokens_per_s", "lr", "grad_norm"):
        assert key in metrics[-1]

    checkpoints = tmp_path / "job" / "checkpoints"
    complete = ckpt.complete_tags(checkpoints)
    assert len(complete) == 2 and complete[-1] == "step-16"     # save_total_limit 2
    tag_dir, _ = resolve(str(checkpoints))          # what the convert stage streams
    assert tag_dir == str(checkpoints / "step-16")
    assert {f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")} | {
        "clusterctl-complete.json", "trainer_state.json", "scheduler.pt"} <= {p.name for p in Path(tag_dir).iterdir()}
    assert not list(checkpoints.rglob("*.safetensors")), "no rank gathered the whole model"
    assert (checkpoints / "hf" / "config.json").exists()
