"""The ssh backend against 4 real sshd hosts (one network namespace each, host keys checked against
known_hosts), through the real CLI and the real supervisor process. Node scripts run small programs
(tests/backends/programs) in place of training."""
import json
import os
import signal
import subprocess
import time

import pytest
from fixtures.runs import finished, program, submit, write_cluster
from fixtures.ssh_hosts import SshHosts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hosts():
    with SshHosts(4) as ssh_hosts:
        yield ssh_hosts


def cluster_yaml(tmp_path, hosts, setup: dict, *, host_names=None, known_hosts=None) -> str:
    return write_cluster(tmp_path / "cluster.yaml", {
        "backend": "ssh", "hosts": host_names or [hosts.hostlist()],
        "ssh": {"user": hosts.user, "identity_file": hosts.identity_file,
                "known_hosts": known_hosts or hosts.known_hosts, "connect_timeout": 5},
        "setup": setup})


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pgids(run_dir, stage: str) -> list[int]:
    return [int(p.read_text().split()[0]) for p in sorted((run_dir / "state" / stage).glob("node-*.pid"))]


def test_sft_on_4_hosts_forms_one_rendezvous(hosts, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, hosts, {"sft": [program("rendezvous")]})
    run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft", "--nodes", "4", "--cluster", yaml)
    status = wait_for(run_id, finished, what="sft to finish")
    assert status["stages"]["sft"]["state"] == "COMPLETED", status
    seen = [json.loads((run_dir / "state/sft" / f"rendezvous-{r:03d}.json").read_text()) for r in range(4)]
    assert [s["host"] for s in seen] == hosts.names                   # rank i on host i
    assert {s["master_addr"] for s in seen} == {hosts.names[0]}
    assert {s["sum"] for s in seen} == {6.0} and {s["world"] for s in seen} == {4}
    for rank, host in enumerate(hosts.names):
        lines = (run_dir / "logs/sft" / f"node-{rank:03d}.log").read_text().splitlines()
        assert lines and all(line.startswith(f"{host}: ") for line in lines)
        assert any("rendezvous ok" in line for line in lines)


def test_three_stages_run_in_order_and_pdsh_by_hand(hosts, clusterctl, wait_for, tmp_path):
    stamp = 'echo "$STAGE $NODE_RANK $(hostname) $1 $(date +%s.%N)" >> "$RUN_DIR/order.txt"'
    yaml = cluster_yaml(tmp_path, hosts, {"all": [f"f() {{ {stamp}; }}; f start; sleep 1; f end; exit 0"]})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "2", "--cluster", yaml)
    status = wait_for(run_id, finished, what="the chain")
    assert [status["stages"][s]["state"] for s in ("sft", "convert", "deploy")] == ["COMPLETED"] * 3, status
    events = [line.split() for line in (run_dir / "order.txt").read_text().splitlines()]
    ends = {s: max(float(e[4]) for e in events if e[0] == s and e[3] == "end") for s in ("sft", "convert")}
    starts = {s: min(float(e[4]) for e in events if e[0] == s and e[3] == "start") for s in ("convert", "deploy")}
    assert ends["sft"] < starts["convert"] and ends["convert"] < starts["deploy"]
    # The rendered pdsh line launches the same node scripts by hand: host i runs node-i.sh.
    (run_dir / "order.txt").unlink()
    env = {**os.environ, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    subprocess.run(["bash", str(run_dir / "sft/pdsh.sh")], env=env, check=True, timeout=60, capture_output=True)
    again = sorted((e[1], e[2]) for e in (line.split() for line in (run_dir / "order.txt").read_text().splitlines())
                   if e[3] == "end")
    assert again == [("0", hosts.names[0]), ("1", hosts.names[1])]


def test_failed_sft_cancels_the_rest(hosts, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, hosts, {"sft": ['if [ "$NODE_RANK" = 2 ]; then exit 3; fi; sleep 60'],
                                          "all": ['echo started >> "$RUN_DIR/started-$STAGE"']})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", yaml)
    status = wait_for(run_id, finished, timeout=60, what="the failure")["stages"]
    assert status["sft"]["state"] == "FAILED" and status["sft"]["exit_code"] == 3, status
    assert status["sft"]["failed_nodes"] == [2] and hosts.names[2] in status["sft"]["reason"]
    assert [status[s]["state"] for s in ("convert", "deploy")] == ["CANCELLED", "CANCELLED"]
    assert not (run_dir / "started-convert").exists() and not (run_dir / "started-deploy").exists()
    assert not [g for g in pgids(run_dir, "sft") if group_alive(g)]     # the sleeping nodes were stopped


def test_killing_one_node_fails_the_stage_and_stops_the_others(hosts, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, hosts, {"all": ["sleep 120"]})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", yaml)
    wait_for(run_id, lambda s: len(pgids(run_dir, "sft")) == 4, what="4 nodes to start")
    groups = pgids(run_dir, "sft")
    os.killpg(groups[1], signal.SIGKILL)
    status = wait_for(run_id, lambda s: s["sft"]["state"] == "FAILED" and finished(s), timeout=60,
                      what="the stage to fail")["stages"]
    assert status["sft"]["failed_nodes"] == [1] and hosts.names[1] in status["sft"]["reason"], status
    assert status["convert"]["state"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while [g for g in groups if group_alive(g)]:
        assert time.monotonic() < deadline, "the other nodes were not stopped"
        time.sleep(0.2)


def test_cancel_stops_every_host(hosts, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, hosts, {"all": ["sleep 120"]})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", yaml)
    wait_for(run_id, lambda s: len(pgids(run_dir, "sft")) == 4, what="4 nodes to start")
    groups = pgids(run_dir, "sft")
    cancelled = json.loads(clusterctl("cancel", run_id, "--json").stdout)["stages"]
    assert {r["state"] for r in cancelled.values()} == {"CANCELLED"}, cancelled
    assert not [g for g in groups if group_alive(g)]
    exits = [(run_dir / "state/sft" / f"node-{r:03d}.exit").read_text().strip() for r in range(4)]
    assert exits == ["143"] * 4                                        # TERM reached each node script


@pytest.mark.parametrize("case", ["unreachable", "unknown host key"])
def test_bad_host_fails_fast_and_starts_nothing(hosts, clusterctl, wait_for, tmp_path, case):
    if case == "unreachable":
        names, known, bad, message = hosts.names[:3] + [hosts.down_host], None, hosts.down_host, "cannot be reached"
    else:
        names, bad, message = hosts.names, hosts.names[2], "unknown host key"
        known = hosts.write_known_hosts(str(tmp_path / "known_hosts"), [n for n in hosts.names if n != bad])
    yaml = cluster_yaml(tmp_path, hosts, {"all": ['echo started >> "$RUN_DIR/started-$NODE_RANK"']},
                        host_names=names, known_hosts=known)
    started = time.monotonic()
    refused = clusterctl("submit", "sft", "--nodes", "4", "--cluster", yaml, check=False)
    assert time.monotonic() - started < 15
    assert refused.returncode == 2 and bad in refused.stderr and message in refused.stderr, refused.stderr
    assert "fix:" in refused.stderr and "nothing was started" in refused.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    status = wait_for(run_dir.name, finished, timeout=5)["stages"]
    assert status["sft"]["state"] == "FAILED" and bad in status["sft"]["reason"], status
    assert [status[s]["state"] for s in ("convert", "deploy")] == ["CANCELLED", "CANCELLED"]
    assert not list(run_dir.glob("started-*")) and not list((run_dir / "state").rglob("node-*.pid"))


def test_cancel_leaves_a_stranger_named_by_a_pid_marker_alone(hosts, clusterctl, wait_for, tmp_path):
    """The marker of node 2 now names someone else's process group (pid reused): it is reported,
    not signalled; the other nodes are stopped."""
    yaml = cluster_yaml(tmp_path, hosts, {"all": ["sleep 120"]})
    run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft", "--nodes", "4", "--cluster", yaml)
    wait_for(run_id, lambda s: len(pgids(run_dir, "sft")) == 4, what="4 nodes to start")
    groups = pgids(run_dir, "sft")
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True)
    marker = run_dir / "state/sft/node-002.pid"
    pgid, host, boot, _ = marker.read_text().split()
    ticks = open(f"/proc/{stranger.pid}/stat").read().rsplit(")", 1)[1].split()[19]
    marker.write_text(f"{stranger.pid} {host} {boot} {int(ticks) - 1}\n")
    try:
        result = clusterctl("cancel", run_id)
        assert stranger.poll() is None, "cancel signalled a process that is not the run's"
        assert f"{marker}: process group {stranger.pid}" in result.stderr and "not signalled" in result.stderr
        assert [g for g in groups if group_alive(g)] == [int(pgid)]
    finally:
        stranger.kill()
        os.killpg(int(pgid), signal.SIGKILL)
