"""`clusterctl doctor` against real sshd hosts and a real Slurm cluster: a healthy cluster passes,
and each broken thing fails its own check, by node, with a non-zero exit."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from fixtures.netns import sh, wait_until
from fixtures.runs import write_cluster
from fixtures.slurm_cluster import SlurmCluster
from fixtures.ssh_hosts import SshHosts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hosts():
    with SshHosts(4) as ssh_hosts:
        yield ssh_hosts


def ssh_yaml(tmp_path, hosts, known_hosts=None, **values) -> str:
    return write_cluster(tmp_path / "cluster.yaml", {
        "backend": "ssh", "hosts": values.pop("host_names", [hosts.hostlist()]), "runs_dir": str(tmp_path / "runs"),
        "ssh": {"user": hosts.user, "identity_file": hosts.identity_file,
                "known_hosts": known_hosts or hosts.known_hosts, "connect_timeout": 5}, **values})


def doctor(clusterctl, yaml, *args) -> tuple[int, dict]:
    result = clusterctl("doctor", "--cluster", yaml, "--json", *args, check=False)
    return result.returncode, json.loads(result.stdout)


def failing(report: dict) -> dict[str, list[str]]:
    return {node["node"]: [name for name, check in node["checks"].items() if not check["ok"]]
            for node in report["nodes"] if not all(c["ok"] for c in node["checks"].values())}


def test_healthy_ssh_cluster_passes(hosts, clusterctl, tmp_path):
    yaml = ssh_yaml(tmp_path, hosts, interface="eth0")
    code, report = doctor(clusterctl, yaml)
    assert code == 0 and report["ok"], report
    assert [n["node"] for n in report["nodes"]] == hosts.names
    assert set(report["nodes"][0]["checks"]) == {"reachable", "clusterctl", "python", "shared runs", "interface",
                                                  "ports"}
    text = clusterctl("doctor", "--cluster", yaml).stdout
    assert text.splitlines()[1].split() == ["node", "reachable", "clusterctl", "python", "shared", "runs",
                                            "interface", "ports"]


def test_each_broken_thing_fails_its_check(hosts, clusterctl, tmp_path):
    known = hosts.write_known_hosts(str(tmp_path / "known_hosts"), [n for n in hosts.names if n != hosts.names[1]])
    # A listener on the head node's vLLM port, in that node's own network namespace.
    listener = subprocess.Popen(hosts.net.wrap(1, [sys.executable, "-c", (
        "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 18123)); s.listen(); time.sleep(120)")]),
        start_new_session=True)
    try:
        wait_until(lambda: subprocess.run(hosts.net.wrap(1, ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/18123"]),
                                          capture_output=True).returncode == 0, 20, "the test listener")
        yaml = ssh_yaml(tmp_path, hosts, known_hosts=known, interface="ib0", gpus_per_node=1,
                        ports={"vllm": 18123}, host_names=hosts.names + [hosts.down_host])
        code, report = doctor(clusterctl, yaml)
    finally:
        os.killpg(listener.pid, 9)
        listener.wait()
    assert code == 1 and not report["ok"]
    bad = failing(report)
    assert bad[hosts.names[1]] == ["reachable"] and bad[hosts.down_host] == ["reachable"]
    assert bad[hosts.names[0]] == ["gpus", "interface", "ports"]
    assert bad[hosts.names[2]] == ["gpus", "interface"]
    checks = {n["node"]: n["checks"] for n in report["nodes"]}
    assert "unknown host key" in checks[hosts.names[1]]["reachable"]["detail"]
    assert "cannot be reached" in checks[hosts.down_host]["reachable"]["detail"]
    assert "nvidia-smi not found" in checks[hosts.names[0]]["gpus"]["detail"]
    assert "18123" in checks[hosts.names[0]]["ports"]["detail"]
    text = clusterctl("doctor", "--cluster", yaml, check=False)
    assert text.returncode == 1 and "fix:" in text.stderr and "check(s) failed" in text.stderr


def test_wrong_python_fails(hosts, clusterctl, tmp_path):
    yaml = ssh_yaml(tmp_path, hosts, python="/usr/bin/python3", host_names=hosts.names[:1])
    code, report = doctor(clusterctl, yaml)
    assert code == 1
    assert failing(report)[hosts.names[0]] == ["clusterctl"], report   # system python has no clusterctl


def test_slurm_cluster_through_srun(clusterctl, tmp_path):
    with SlurmCluster(nodes=4, gpus_per_node=0) as slurm:
        yaml = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "runs_dir": str(tmp_path / "runs"),
                                                      "interface": "eth0", "slurm": {"partition": slurm.partition}})
        result = clusterctl("doctor", "--cluster", yaml, "--json", "--nodes", "4", check=False,
                            env={"SLURM_CONF": slurm.conf})
        report = json.loads(result.stdout)
        assert result.returncode == 0 and report["ok"], report
        assert sorted(n["node"] for n in report["nodes"]) == slurm.node_names
        result = clusterctl("doctor", "--cluster", yaml, "--json", "--nodes", "5", "--wait", "3", check=False,
                            env={"SLURM_CONF": slurm.conf})
        assert result.returncode == 1 and "did not answer" in json.dumps(json.loads(result.stdout))


def test_unknown_host_accepted_only_when_the_user_says_so(hosts, clusterctl, tmp_path):
    known = hosts.write_known_hosts(str(tmp_path / "known_hosts"), hosts.names[1:])
    strict = ssh_yaml(tmp_path, hosts, known_hosts=known, host_names=hosts.names[:2])
    code, report = doctor(clusterctl, strict)
    assert code == 1 and failing(report) == {hosts.names[0]: ["reachable"]}
    values = json.loads(open(strict).read())
    values["ssh"]["insecure_accept_unknown_hosts"] = True
    code, report = doctor(clusterctl, write_cluster(tmp_path / "cluster.yaml", values))
    assert code == 0 and report["ok"], report


@contextmanager
def throttled(net, i: int):
    """Host i's link shaped to 10 Mbit/s (tbf on the bridge side of its veth: traffic toward the host)."""
    device = f"cc{net.index}v{i}"
    sh("tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", "10mbit", "burst", "32kbit", "latency", "400ms")
    try:
        yield net.names[i - 1]
    finally:
        sh("tc", "qdisc", "del", "dev", device, "root", check=False)


def bandwidth(clusterctl, yaml, *args, env=None) -> tuple[int, dict]:
    # The shaped link (10 Mbit/s) is ~0.4% of loopback; unshaped pairs sharing 2 cores dip to ~35% of the median.
    result = clusterctl("doctor", "--cluster", yaml, "--bandwidth", "--size-mb", "0.5", "--slow-below", "0.1", "--json",
                        *args,
                        check=False, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def statuses(verdict: dict) -> dict[str, str]:
    return {node["node"]: node["status"] for node in verdict["nodes"]}


def test_bandwidth_names_the_throttled_ssh_host_and_the_one_that_never_joins(hosts, clusterctl, tmp_path):
    yaml = ssh_yaml(tmp_path, hosts)
    with throttled(hosts.net, 3) as slow:
        code, verdict = bandwidth(clusterctl, yaml)
    assert code == 1 and not verdict["ok"]
    assert statuses(verdict) == {name: "SLOW" if name == slow else "ok" for name in hosts.names}, verdict
    rows = {node["node"]: node for node in verdict["nodes"]}
    assert rows[slow]["bandwidth"] < 2e6 < 20 * rows[slow]["bandwidth"] < min(
        row["bandwidth"] for name, row in rows.items() if name != slow)      # 10 Mbit/s = 1.25 MB/s
    assert verdict["busbw"] < 2e6                                          # the ring runs at its slowest link

    # unthrottled, the loopback pairs share 2 cores: only a node 10x below the median counts as slow here
    text = clusterctl("doctor", "--cluster", yaml, "--bandwidth", "--size-mb", "0.5",
                      "--slow-below", "0.1").stdout.splitlines()
    assert text[0].startswith("all-reduce of 0.5 MiB over 4 nodes (gloo): bus bandwidth ")
    assert text[1].split() == ["node", "rank", "best", "pair", "GB/s", "status"]
    assert all(line.split()[-1] == "ok" for line in text[2:])

    with_down = ssh_yaml(tmp_path, hosts, host_names=hosts.names[:2] + [hosts.down_host])
    code, verdict = bandwidth(clusterctl, with_down, "--join-timeout", "10")
    assert code == 1
    assert statuses(verdict) == {hosts.names[0]: "joined", hosts.names[1]: "joined", hosts.down_host: "MISSING"}
    assert "cannot be reached" in verdict["nodes"][2]["detail"]
    assert verdict["nodes"][0]["detail"] == f"not measured: {hosts.down_host} did not join"


def test_bandwidth_through_srun_names_the_throttled_node(clusterctl, tmp_path):
    with SlurmCluster(nodes=4, gpus_per_node=0) as slurm:
        yaml = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "runs_dir": str(tmp_path / "runs"),
                                                      "slurm": {"partition": slurm.partition}})
        with throttled(slurm.hosts, 2) as slow:
            code, verdict = bandwidth(clusterctl, yaml, "--nodes", "4", env={"SLURM_CONF": slurm.conf})
    assert code == 1, verdict
    assert statuses(verdict) == {name: "SLOW" if name == slow else "ok" for name in slurm.node_names}, verdict
