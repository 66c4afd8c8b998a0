"""`clusterctl submit grpo --nodes 2` with no job file, for real on the local backend: GRPO on Countdown
on 2 nodes -> convert -> vLLM serves the converted model -> health check; then cancel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.ports import free_port

from clusterctl.procs import processes_with_env

pytestmark = pytest.mark.slow


def test_builtin_countdown_grpo_runs_end_to_end(clusterctl, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"backend: local\nports: {{vllm: {free_port()}}}\n")
    submitted = clusterctl("submit", "grpo", "--nodes", "2", "--cluster", cluster, "--json", timeout=1500)
    run = json.loads(submitted.stdout)
    try:
        assert "PASS  POST /v1/chat/completions" in submitted.stderr, submitted.stderr[-3000:]
        stages = json.loads(clusterctl("status", run["run"], "--json").stdout)["stages"]
        assert [stages[s]["state"] for s in ("grpo", "convert", "deploy")] == ["COMPLETED", "COMPLETED", "RUNNING"]
        assert stages["deploy"]["served_model"] == "tiny-deepseek-v3-grpo"
        run_dir = Path(run["dir"])
        metrics = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4]
        for key in ("rewards/format_reward/mean", "rewards/equation_reward/mean", "reward_std",
                    "completions/mean_length", "tokens_per_s"):
            assert key in metrics[-1]
        assert sorted(p.name for p in (run_dir / "logs" / "grpo").iterdir()) == ["node-000.log", "node-001.log"]
        assert (Path(stages["convert"]["output"]) / "clusterctl-complete.json").exists()
        marker = json.loads((run_dir / "grpo" / "checkpoints" / "step-4" /
                             "clusterctl-complete.json").read_text())
        assert marker["world_size"] == 2 and marker["kind"] == "grpo"
    finally:
        clusterctl("cancel", run["run"])
    assert processes_with_env(f"RUN_DIR={run['dir']}") == []
