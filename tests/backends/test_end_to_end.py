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

