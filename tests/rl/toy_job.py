"""A GRPO job as a user submits it (`clusterctl submit grpo --job grpo.yaml`): the tiny model, toy
prompts and the learnable toy reward of rl_run.py in a reward file beside the spec."""
from __future__ import annotations

import json
from pathlib import Path

import psutil
from rl_run import TOY_REWARD

from clusterctl.procs import processes_with_env


def write_job(folder: Path, *, nodes: int = 2, host: str = "127.0.0.1", **grpo) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_rewards.py").write_text(TOY_REWARD)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: say something."}) + "\n"
                                                  for i in range(64)))
    spec = {"name": "toy-grpo", "kind": "grpo", "model": "builtin:tiny-deepseek-v3", "data": "prompts.jsonl",
            "grpo": {"nodes": nodes, "rewards": ["toy_rewards.py:ids_divisible_by_4"], "num_generations": 8,
                     "max_completion_length": 8, "micro_batch": 8, "lr": 3e-2, "bf16": False, "zero_stage": 3,
                     **grpo},
            "convert": {"nodes": 1, "dtype": "fp32"},
            "deploy": {"nodes": 1, "served_model_name": "toy-grpo", "host": host}}
    path = folder / "grpo.yaml"
    path.write_text(json.dumps(spec, indent=2))      # JSON is YAML
    return path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ranks_of(run_dir: Path) -> list[psutil.Process]:
    """The run's training ranks on this machine (torchrun's workers, not torchrun or the node script)."""
    ranks = []
    for pid in processes_with_env(f"RUN_DIR={run_dir}"):
        try:
            process = psutil.Process(pid)
            if "LOCAL_RANK" in process.environ() and "clusterctl.training.rl.grpo" in " ".join(process.cmdline()):
                ranks.append(process)
        except psutil.Error:
            continue
    return ranks
