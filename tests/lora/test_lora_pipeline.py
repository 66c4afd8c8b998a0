"""`clusterctl submit sft --nodes 2` on the local backend with sft.method: lora: two local nodes train the
adapters (every target group) under ZeRO-3, convert merges them into the base, vLLM serves the merged model
and `clusterctl health` passes; then cancel leaves nothing running."""
import json
from pathlib import Path

import pytest
from fixtures.ports import free_port
from lora_checks import assert_all_groups_targeted, assert_merge_changed_only_adapted

from clusterctl.procs import processes_with_env

pytestmark = pytest.mark.slow


def test_lora_chain_on_two_local_nodes_serves_the_merged_model(clusterctl, tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"backend: local\nports: {{vllm: {free_port()}}}\n")
    job = tmp_path / "job.yaml"
    job.write_text("sft: {nodes: 2, max_length: 128, micro_batch: 1, grad_accum: 1, max_steps: 2, save_steps: 2, "
                   "offload_optimizer: false, offload_param: false, method: lora, "
                   "lora: {rank: 4, alpha: 8, targets: [all]}}\n")
    submitted = clusterctl("submit", "sft", "--cluster", cluster, "--job", job, "--json", timeout=1200)
    run = json.loads(submitted.stdout)
    try:
        assert "PASS  POST /v1/chat/completions" in submitted.stderr, submitted.stderr[-3000:]
        stages = json.loads(clusterctl("status", run["run"], "--json").stdout)["stages"]
        assert [stages[s]["state"] for s in ("sft", "convert", "deploy")] == ["COMPLETED", "COMPLETED", "RUNNING"]
        run_dir = Path(run["dir"])
        described = assert_all_groups_targeted(run_dir / "sft" / "checkpoints", rank=4)
        log = (run_dir / "logs" / "sft" / "node-000.log").read_text()
        assert "[sft]   model.layers.0.mlp.gate_proj" in log                 # the trained list, in the node log
        merged = Path(stages["convert"]["output"])
        marker = json.loads((merged / "clusterctl-complete.json").read_text())
        assert marker["merged"] == 48 and marker["verify"]["logits"] == "match"
        assert_merge_changed_only_adapted(merged, described)
        assert (merged.parent / "model-adapter" / "adapter_config.json").is_file()
        health = clusterctl("health", run["run"])
        assert "PASS" in health.stdout + health.stderr
    finally:
        clusterctl("cancel", run["run"])
    assert processes_with_env(f"RUN_DIR={run['dir']}") == []
