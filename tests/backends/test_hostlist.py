"""Host lists as users write them for pdsh and Slurm."""
import pytest

from clusterctl.errors import ConfigError
from clusterctl.hostlist import expand_hostlist


@pytest.mark.parametrize("text, hosts", [
    ("node07", ["node07"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("a, b ,c", ["a", "b", "c"]),
    ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
])
def test_expands(text, hosts):
    assert expand_hostlist(text) == hosts


def test_32_nodes_keep_padding():
    hosts = expand_hostlist("node[01-32]")
    assert len(hosts) == 32 and hosts[0] == "node01" and hosts[-1] == "node32"


@pytest.mark.parametrize("text, message", [
    ("node[3-1]", "bad range '3-1'"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[1-2", "bad host name or list 'node[1-2'"),
    ("node;rm -rf /", "bad host name or list"),
    ("node[1-2],node2", "host 'node2' is listed twice"),
])
def test_refuses_with_where(text, message):
    with pytest.raises(ConfigError) as err:
        expand_hostlist(text, where="cluster.yaml: hosts")
    assert message in str(err.value) and "cluster.yaml: hosts" in str(err.value)
