"""The whole product on a real multi-node cluster: `clusterctl submit sft --nodes 4` with the built-in
tiny DeepSeek-V3 job runs sft -> convert -> deploy to an endpoint that answers `clusterctl health`,
through the Slurm backend and through the ssh backend. Slow (real training, conversion, vLLM)."""
import json
import os

import pytest
from fixtures.runs import submit, write_cluster, write_yaml
from fixtures.slurm_cluster import SlurmCluster
from fixtures.ssh_hosts import SshHosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# The built-in tiny job, shorter, served on the node's cluster address (127.0.0.1 would be the
# node's own loopback: not reachable from the submitting machine).
JOB = {"name": "tiny-e2e", "model": "builtin:tiny-deepseek-v3", "data": "builtin:tiny-reasoning",
       "sft": {"nodes": 4, "max_length": 128, "micro_batch": 1, "grad_accum": 1, "max_steps": 4, "lr": 1.0e-3,
               "zero_stage": 3, "bf16": True, "save_steps": 2, "save_total_limit": 1},
       "convert": {"nodes": 1, "dtype": "bf16"},
       "deploy": {"nodes": 1, "served_model_name": "tiny-e2e", "max_model_len": 256, "ready_timeout": 900,
                  "host": "0.0.0.0"}}


def run_chain(clusterctl, wait_for, tmp_path, cluster: dict, env=None) -> None:
    cluster_file = write_cluster(tmp_path / "cluster.yaml", {**cluster, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    job_file = write_yaml(tmp_path / "job.yaml", JOB)
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", cluster_file, "--job", job_file)
    try:
        status = wait_for(run_id, lambda s: s["deploy"].get("endpoint") or
                          any(r["state"] in ("FAILED", "CANCELLED") for r in s.values()),
                          timeout=1200, what="the endpoint")["stages"]
        assert [status[s]["state"] for s in ("sft", "convert")] == ["COMPLETED", "COMPLETED"], status
        assert status["deploy"]["state"] == "RUNNING" and status["deploy"]["endpoint"], status
        health = clusterctl("health", run_id, "--json", timeout=600, env=env)
        assert json.loads(health.stdout)["ok"], health.stdout
        assert (run_dir / "convert/model/clusterctl-complete.json").exists()
        assert len(list((run_dir / "logs/sft").glob("node-*.log"))) == 4
    finally:
        clusterctl("cancel", run_id, check=False, env=env)


def test_slurm_chain_to_a_healthy_endpoint(clusterctl, wait_for, tmp_path):
    with SlurmCluster(nodes=4, gpus_per_node=0) as slurm:
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = slurm.conf
        try:
            run_chain(clusterctl, wait_for, tmp_path, {"backend": "slurm",
                                                       "slurm": {"partition": slurm.partition, "time": "30:00"}})
        finally:
            os.environ.pop("SLURM_CONF") if saved is None else os.environ.update(SLURM_CONF=saved)


def test_ssh_chain_to_a_healthy_endpoint(clusterctl, wait_for, tmp_path):
    with SshHosts(4) as hosts:
        run_chain(clusterctl, wait_for, tmp_path, {
            "backend": "ssh", "hosts": [hosts.hostlist()],
            "ssh": {"user": hosts.user, "identity_file": hosts.identity_file, "known_hosts": hosts.known_hosts}})



def test_slurm_preempted_sft_checkpoints_requeues_and_resumes(clusterctl, wait_for, tmp_path):
    """The real trainer under the time-limit warning: USR2 (as --signal=B:USR2@S delivers it) makes
    it save a checkpoint and stop; the job requeues and the next run resumes from that checkpoint."""
    import subprocess
    import time

    job = {**JOB, "sft": {**JOB["sft"], "nodes": 2, "max_steps": 400, "save_steps": 1000}}
    with SlurmCluster(nodes=2, gpus_per_node=0) as slurm:
        cluster_file = write_cluster(tmp_path / "cluster.yaml", {
            "backend": "slurm", "slurm": {"partition": slurm.partition, "time": "30:00", "max_restarts": 2}})
        job_file = write_yaml(tmp_path / "job.yaml", job)
        env = {"SLURM_CONF": slurm.conf}
        out = json.loads(clusterctl("submit", "sft", "--stages", "sft", "--cluster", cluster_file,
                                    "--job", job_file, "--json", env=env).stdout)
        run_dir = tmp_path / "runs" / out["run"]
        job_id = json.loads((run_dir / "run.json").read_text())["stages"]["sft"]["job_id"]
        metrics = run_dir / "sft/metrics.jsonl"
        deadline = time.monotonic() + 600
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(1)
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], env=slurm.env, check=True, timeout=30)
        deadline = time.monotonic() + 300
        while "Restarts=1" not in (show := subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm.env,
                                                          capture_output=True, text=True, timeout=30).stdout) \
                or "JobState=PENDING" not in show:
            assert time.monotonic() < deadline, f"no requeue: {show}"
            time.sleep(1)
        preempted = json.loads((run_dir / "sft/checkpoints/preempted.json").read_text())
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm.env, check=True,
                       timeout=30)
        out_of_time = time.monotonic() + 900
        while True:
            record = json.loads(clusterctl("status", out["run"], "--json", env=env).stdout)["stages"]["sft"]
            if record["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            assert time.monotonic() < out_of_time, record
            time.sleep(2)
        assert record["state"] == "COMPLETED", record
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
        assert steps[-1] == 400 and steps.count(preempted["step"] + 1) == 1   # resumed after it, no step repeated
