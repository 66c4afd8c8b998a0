"""Node-side helpers of the deploy script: the address Ray and vLLM are pinned to, and a vLLM that dies
before it is healthy failing the node at once (not at the readiness deadline)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from clusterctl.deploy.node_ip import node_ip
from clusterctl.errors import UserError
from tests.deploy.conftest import NodeScripts, free_port, render_deploy


def test_the_address_is_the_route_toward_the_head_or_the_named_interface():
    assert node_ip(interface="", toward="127.0.0.1", nodes=2) == "127.0.0.1"
    assert node_ip(interface="lo", toward="unused", nodes=2) == "127.0.0.1"


def test_an_unknown_interface_is_named_with_the_ones_that_exist():
    with pytest.raises(UserError) as error:
        node_ip(interface="ib9", toward="127.0.0.1", nodes=2)
    assert "cluster.yaml: interface: network interface 'ib9' does not exist" in str(error.value)
    assert "lo" in str(error.value).split("fix:")[1]


def test_a_head_name_resolving_to_loopback_is_refused_for_multi_node():
    """Debian maps a host's own name to 127.0.1.1: the head would register an address no worker reaches."""
    name = socket.gethostname()
    if not socket.gethostbyname(name).startswith("127."):
        pytest.skip(f"{name} does not resolve to loopback here")
    assert node_ip(interface="", toward=name, nodes=1).startswith("127.")
    with pytest.raises(UserError, match="resolves to a loopback address on this node"):
        node_ip(interface="", toward=name, nodes=2)


def test_node_ip_cli_names_the_problem():
    result = subprocess.run([sys.executable, "-m", "clusterctl.deploy.node_ip", "--toward", "no-such-host.invalid",
                             "--nodes", "2"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot resolve the head node 'no-such-host.invalid'" in result.stderr


@pytest.mark.slow
def test_a_vllm_that_dies_while_starting_fails_the_node_at_once(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()                                        # no config.json: vLLM exits during start-up
    run = render_deploy(tmp_path / "run", model=broken, vllm_port=free_port(), host="127.0.0.1", ready_timeout=600)
    nodes = NodeScripts(run, 1)
    try:
        start = time.monotonic()
        proc = nodes.start(0)
        proc.wait(timeout=300)
        assert proc.returncode != 0
        assert time.monotonic() - start < 300            # long before ready_timeout
        assert "exited before http://127.0.0.1:" in nodes.log(0)
        assert not (run.state_dir("deploy") / "endpoint.json").exists()
        assert (run.state_dir("deploy") / "node-000.exit").read_text().strip() == str(proc.returncode)
        assert nodes.leftovers() == []
    finally:
        nodes.close()
