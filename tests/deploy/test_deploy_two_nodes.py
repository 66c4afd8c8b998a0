"""Two-node deploys from the rendered scripts, each node in its own network namespace: the Ray cluster
is started and gated for real, vLLM's CPU build serves from node 0, and a cancel stops everything; with
the worker missing, the head fails by its deadline naming it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.deploy.conftest import NodeScripts, free_port, render_deploy
from tests.fixtures.netns import NetnsHosts, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def hosts():
    hosts = NetnsHosts(2).start()
    temp = tempfile.mkdtemp(prefix="ccray", dir="/tmp")
    hosts.ray_temp = temp
    try:
        yield hosts
    finally:
        hosts.close()
        shutil.rmtree(temp, ignore_errors=True)


def deploy(tmp_path, hosts, model, **spec):
    run = render_deploy(tmp_path / "run", model=model, nodes=2, hosts=hosts.names, head=hosts.addrs[0],
                        ray_port=6380, vllm_port=free_port(), ray_temp_dir=hosts.ray_temp, **spec)
    return run, NodeScripts(run, 2, wrap=lambda rank, argv: hosts.wrap(rank + 1, argv))


def test_two_node_deploy_gates_ray_serves_and_stops_cleanly(tmp_path, hosts, tiny_model):
    run, nodes = deploy(tmp_path, hosts, tiny_model)
    try:
        head, worker = nodes.start(0), nodes.start(1)

        def alive():
            for rank, proc in ((0, head), (1, worker)):
                if proc.poll() is not None:
                    raise AssertionError(f"node {rank} exited {proc.returncode}:\n{nodes.logs()}")
        endpoint_file = run.state_dir("deploy") / "endpoint.json"
        wait_until(endpoint_file.exists, 400, "the 2-node deploy to become healthy", alive)
        endpoint = json.loads(endpoint_file.read_text())
        assert endpoint == {"url": f"http://{hosts.addrs[0]}:{run_port(run)}", "model": "tiny-r1"}
        head_log = nodes.log(0)
        assert "[wait_ray] Ray at" in head_log and "is ready" in head_log
        assert f"node-001@{hosts.addrs[1]}" in head_log
        assert "--distributed-executor-backend" not in head_log      # CPU: vLLM serves from node 0 alone

        result = subprocess.run([sys.executable, "-m", "clusterctl.cli", "health", str(run.dir)],
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr

        codes = nodes.terminate(grace=90)
        assert codes == {0: 143, 1: 143}, nodes.logs()
        assert nodes.leftovers() == [], "Ray or vLLM outlived the cancel"
    finally:
        nodes.close()


def run_port(run) -> int:
    text = run.node_script("deploy", 0).read_text()
    return int(next(line for line in text.splitlines() if line.startswith("VLLM_PORT=")).split("=")[1])


def test_head_fails_by_its_deadline_naming_the_worker_that_never_started(tmp_path, hosts, tiny_model):
    run, nodes = deploy(tmp_path, hosts, tiny_model, ready_timeout=20)
    try:
        head = nodes.start(0)                 # node 1 is never started
        head.wait(timeout=180)
        assert head.returncode == 1, nodes.logs()
        log = nodes.log(0)
        assert "missing: node-001 (its node script never started)" in log, log[-3000:]
        assert not (run.state_dir("deploy") / "endpoint.json").exists()
        assert "vllm serve" not in log
        assert nodes.leftovers() == [], "the head's Ray outlived its failed gate"
    finally:
        nodes.close()
