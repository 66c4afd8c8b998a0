"""The embedded default end to end on the local backend, and a node killed mid-training."""
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures.ports import free_port

from clusterctl.procs import processes_with_env


def processes_of(run_dir: str) -> list[int]:
    """Every live process started for this run (node scripts export RUN_DIR)."""
    return processes_with_env(f"RUN_DIR={run_dir}")


def status(clusterctl, run_id) -> dict:
    return json.loads(clusterctl("status", run_id, "--json").stdout)


def submit_training(clusterctl, cluster: str, tmp_path, sft: str, *stage_args) -> dict:
    """Submit a small SFT job (2 local nodes, `sft` settings added) without following it."""
    job = tmp_path / "job.yaml"
    job.write_text("sft: {nodes: 2, max_length: 128, micro_batch: 1, grad_accum: 1, offload_optimizer: false,"
                   f" offload_param: false, gradient_checkpointing: false, {sft}}}\n")
    return json.loads(clusterctl("submit", "sft", *stage_args, "--cluster", cluster, "--job", job,
                                 "--detach", "--json").stdout)


@pytest.fixture
def local_cluster(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"backend: local\nports: {{vllm: {free_port()}}}\n")
    return str(path)


@pytest.mark.slow
def test_embedded_default_pipeline_serves_then_cancels_cleanly(clusterctl, local_cluster):
    submitted = clusterctl("submit", "sft", "--nodes", "2", "--cluster", local_cluster, "--json", timeout=1200)
    run = json.loads(submitted.stdout)
    try:
        assert "PASS  POST /v1/chat/completions" in submitted.stderr and "answer: " in submitted.stderr
        assert "curl -sS -X POST" in submitted.stderr
        stages = status(clusterctl, run["run"])["stages"]
        assert [stages[s]["state"] for s in ("sft", "convert", "deploy")] == ["COMPLETED", "COMPLETED", "RUNNING"]
        endpoint = stages["deploy"]["endpoint"]
        assert endpoint.startswith("http://127.0.0.1:")
        assert (Path(stages["convert"]["output"]) / "clusterctl-complete.json").exists()
        request = urllib.request.Request(
            endpoint + "/v1/chat/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": stages["deploy"]["served_model"], "max_tokens": 8,
                             "messages": [{"role": "user", "content": "What is 2+3?"}]}).encode())
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        clusterctl("cancel", run["run"])
    assert status(clusterctl, run["run"])["stages"]["deploy"]["state"] == "CANCELLED"
    assert processes_of(run["dir"]) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint + "/health", timeout=5)


@pytest.mark.slow
def test_killing_one_node_fails_the_stage_and_cancels_the_rest(clusterctl, local_cluster, tmp_path):
    run = submit_training(clusterctl, local_cluster, tmp_path, "max_steps: 100000, save_steps: 100000")
    metrics = Path(run["dir"]) / "sft" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline, "training never logged a step"
        assert status(clusterctl, run["run"])["stages"]["sft"]["state"] in ("PENDING", "RUNNING")
        time.sleep(1)
    victim = next(pid for pid in processes_of(run["dir"])
                  if b"clusterctl.training.sft" in Path(f"/proc/{pid}/cmdline").read_bytes()
                  and b"torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_bytes()
                  and b"NODE_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    while status(clusterctl, run["run"])["stages"]["sft"]["state"] == "RUNNING":
        assert time.time() - killed_at < 30, "the stage did not notice the dead node"
        time.sleep(0.5)
    stages = status(clusterctl, run["run"])["stages"]
    assert stages["sft"]["state"] == "FAILED"
    assert stages["sft"]["reason"].startswith("node 1 (localhost) exited")
    assert stages["sft"]["failed_nodes"] == [1]
    assert stages["convert"]["state"] == stages["deploy"]["state"] == "CANCELLED"
    assert stages["convert"]["reason"] == "sft failed"
    assert processes_of(run["dir"]) == []


@pytest.mark.slow
def test_retry_resumes_sft_from_its_last_complete_checkpoint(clusterctl, local_cluster, tmp_path):
    run = submit_training(clusterctl, local_cluster, tmp_path, "max_steps: 120, save_steps: 3, save_total_limit: 1",
                          "--stages", "sft")
    checkpoints = Path(run["dir"]) / "sft" / "checkpoints"
    deadline = time.time() + 600
    while not list(checkpoints.glob("*/clusterctl-complete.json")):
        assert time.time() < deadline, "no complete checkpoint was written"
        time.sleep(0.5)
    clusterctl("cancel", run["run"])
    saved = json.loads((Path(run["dir"]) / "sft" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    metrics = Path(run["dir"]) / "sft" / "metrics.jsonl"
    lines_before = len(metrics.read_text().splitlines())
    clusterctl("retry", run["run"], timeout=900)
    after = [json.loads(line) for line in metrics.read_text().splitlines()[lines_before:]]
    assert status(clusterctl, run["run"])["stages"]["sft"]["state"] == "COMPLETED"
    assert after and after[-1]["step"] == 120
    assert 1 < after[0]["step"] <= saved + 1   # resumed after a saved step, not from step 1
