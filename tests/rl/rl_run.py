"""Real runs of the RL kinds for the tests: the entry points (clusterctl.training.rl.*) under torchrun, and a built-in
job end to end through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures.ports import free_port

from clusterctl.procs import processes_with_env

TOY_REWARD = '''
def ids_divisible_by_4(completion_ids, **kwargs):
    """A reward a random tiny model can learn fast: the share of its tokens whose id is a multiple of 4."""
    return [sum(i % 4 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]
'''


def command(module: str, config: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", f"clusterctl.training.rl.{module}", "--config", str(config)]


def base_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"output_dir": str(folder / "checkpoints"), "metrics_file": str(folder / "metrics.jsonl"),
              "model": "builtin:tiny-deepseek-v3", "bf16": False, **values}
    path = folder / "train.json"
    path.write_text(json.dumps(values))
    return path


def toy_grpo(folder: Path, **values) -> Path:
    """A GRPO job on toy prompts with the learnable toy reward."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_rewards.py").write_text(TOY_REWARD)
    with open(folder / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"Question {i}: say something.", "topic": "toy"}) + "\n" for i in range(64))
    grpo = {"rewards": [f"{folder / 'toy_rewards.py'}:ids_divisible_by_4"], "num_generations": 8,
            "max_completion_length": 8, **values.pop("grpo", {})}
    return write_config(folder, **{"kind": "grpo", "data": str(folder / "prompts.jsonl"), "micro_batch": 8,
                                   "max_steps": 16, "lr": 3e-2, "save_steps": 8, "grpo": grpo, **values})


def run(module: str, config: Path, nproc: int = 2, timeout: int = 600, expect: int = 0,
        env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command(module, config, nproc), capture_output=True, text=True, timeout=timeout, check=False,
                            env={**base_env(), **(env or {})}, start_new_session=True)
    if (result.returncode == 0) != (expect == 0):
        raise AssertionError(f"{module} exited {result.returncode}, expected {expect}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_builtin_end_to_end(clusterctl, tmp_path: Path, kind: str, metric_keys) -> None:
    """`clusterctl submit KIND --nodes 2` with no job file on the local backend: train (4 steps, 2 nodes) ->
    convert -> vLLM serves -> health PASS; the metrics hold `metric_keys`; then cancel leaves no process."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"backend: local\nports: {{vllm: {free_port()}}}\n")
    submitted = clusterctl("submit", kind, "--nodes", "2", "--cluster", cluster, "--json", timeout=1500)
    run = json.loads(submitted.stdout)
    try:
        assert "PASS  POST /v1/chat/completions" in submitted.stderr, submitted.stderr[-3000:]
        stages = json.loads(clusterctl("status", run["run"], "--json").stdout)["stages"]
        assert [stages[s]["state"] for s in (kind, "convert", "deploy")] == ["COMPLETED", "COMPLETED", "RUNNING"]
        assert stages["deploy"]["served_model"] == f"tiny-deepseek-v3-{kind}"
        run_dir = Path(run["dir"])
        metrics = read_metrics(run_dir / kind / "metrics.jsonl")
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        assert set(metric_keys) <= set(metrics[-1]), sorted(metrics[-1])
        assert sorted(p.name for p in (run_dir / "logs" / kind).iterdir()) == ["node-000.log", "node-001.log"]
        assert (Path(stages["convert"]["output"]) / "clusterctl-complete.json").exists()
        marker = json.loads((run_dir / kind / "checkpoints" / "step-4" / "clusterctl-complete.json").read_text())
        assert marker["world_size"] == 2 and marker["kind"] == kind
    finally:
        clusterctl("cancel", run["run"])
    assert processes_with_env(f"RUN_DIR={run['dir']}") == []
