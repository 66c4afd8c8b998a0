"""The readiness gate against a real Ray cluster: a head and one worker, each in its own network
namespace (Ray listens on all interfaces, so never on the host's), joined over a private bridge."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.fixtures.netns import NetnsHosts

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
PORT = 6380


@pytest.fixture(scope="module")
def ray_cluster():
    hosts = NetnsHosts(2).start()
    temp = tempfile.mkdtemp(prefix="ccray", dir="/tmp")   # Ray's socket paths must stay under 107 bytes
    procs = []
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--disable-usage-stats", "--num-cpus", "1", "--num-gpus", "0"]
    try:
        for rank, extra in ((0, ["--head", "--port", str(PORT), "--include-dashboard", "false"]),
                            (1, ["--address", f"{hosts.addrs[0]}:{PORT}"])):
            argv = [RAY, "start", *common, *extra, "--node-ip-address", hosts.addrs[rank],
                    "--node-name", f"node-{rank:03d}", "--temp-dir", f"{temp}/n{rank}"]
            procs.append(subprocess.Popen(hosts.wrap(rank + 1, argv), env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        yield hosts
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        hosts.close()         # also kills whatever is left in the namespaces
        shutil.rmtree(temp, ignore_errors=True)


def gate(hosts: NetnsHosts, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The gate as the head node's script runs it: inside the head's namespace."""
    argv = [sys.executable, "-m", "clusterctl.deploy.wait_ray", "--address", f"{hosts.addrs[0]}:{PORT}", *map(str, args)]
    return subprocess.run(hosts.wrap(1, argv), capture_output=True, text=True, timeout=timeout)


def test_gate_passes_once_both_nodes_joined(ray_cluster):
    result = gate(ray_cluster, "--nodes", 2, "--timeout", 90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is ready" in result.stdout
    assert f"node-000@{ray_cluster.addrs[0]}" in result.stdout and f"node-001@{ray_cluster.addrs[1]}" in result.stdout


def test_gate_names_the_node_that_never_joined_and_its_host(ray_cluster, tmp_path):
    assert gate(ray_cluster, "--nodes", 2, "--timeout", 90).returncode == 0   # the two real ones are in
    (tmp_path / "node-002.pid").write_text("4242 gpu-node-17\n")
    start = time.monotonic()
    result = gate(ray_cluster, "--nodes", 4, "--timeout", 4, "--state-dir", tmp_path)
    assert result.returncode == 1
    assert time.monotonic() - start < 30
    assert "not ready after 4 s: 2 of 4 nodes joined; missing: node-002 (host gpu-node-17, started but not joined), " \
           "node-003 (its node script never started)" in result.stdout
    assert "fix:" in result.stdout and "interface" in result.stdout


def test_gate_counts_gpus(ray_cluster):
    result = gate(ray_cluster, "--nodes", 2, "--gpus", 16, "--timeout", 3)
    assert result.returncode == 1
    assert "0 of 16 GPUs registered (node-000 0, node-001 0)" in result.stdout


def test_gate_without_a_head_fails_by_its_deadline(ray_cluster):
    argv = [sys.executable, "-m", "clusterctl.deploy.wait_ray", "--address", f"{ray_cluster.addrs[1]}:{PORT + 1}",
            "--nodes", "2", "--timeout", "3"]
    start = time.monotonic()
    result = subprocess.run(ray_cluster.wrap(2, argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "the Ray head (GCS) does not answer" in result.stdout
    assert time.monotonic() - start < 20
