"""Launching real multi-rank SFT runs of clusterctl.training.sft under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures.ports import free_port


def sft_command(config: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
            "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "clusterctl.training.sft", "--config", str(config)]


def sft_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"output_dir": str(folder / "checkpoints"), "metrics_file": str(folder / "metrics.jsonl"),
              "max_length": 256, "micro_batch": 2, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.1,
              "offload_optimizer": False, "offload_param": False, **values}
    path = folder / "train.json"
    path.write_text(json.dumps(values))
    return path


def run_sft(config: Path, nproc: int = 2, timeout: int = 600, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(sft_command(config, nproc), capture_output=True, text=True, timeout=timeout,
                            env=sft_env(), start_new_session=True)
    if result.returncode != expect:
        raise AssertionError(f"sft exited {result.returncode}, expected {expect}\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
