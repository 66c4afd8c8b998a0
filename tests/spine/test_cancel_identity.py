"""`cancel` signals only processes the run started: a pid or process group recorded in the run
folder that now names another process (pid reuse after a crash or reboot, a copied run folder) is
left alone, with a message saying why."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from fixtures.runs import as_submitted, dry_run

from clusterctl.procs import Identity, alive, boot_id, processes_with_env
from clusterctl.run import Run


@pytest.fixture
def stranger():
    """A process of someone else's, in a group of its own (as a node script's group would be)."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


def stale(identity: Identity) -> Identity:
    """The same pid as recorded by a process that started earlier (the pid has been reused since)."""
    return Identity(identity.pid, identity.host, identity.boot_id, identity.start_ticks - 1)


@pytest.mark.parametrize("pid_file", ["reused", "other host", "old format"])
def test_a_pid_marker_naming_a_stranger_is_not_signalled(clusterctl, tmp_path, stranger, pid_file):
    run_dir = dry_run(clusterctl, tmp_path)
    as_submitted(run_dir, state="RUNNING")
    me = Identity.of(stranger.pid)
    text = {"reused": f"{me.pid} {me.host} {me.boot_id} {me.start_ticks - 1}",
            "other host": f"{me.pid} elsewhere {me.boot_id} {me.start_ticks}",
            "old format": f"{me.pid} {me.host}"}[pid_file]
    run = Run(run_dir)
    run.state_dir("sft").mkdir(parents=True)
    run.node_marker("sft", 0, "pid").write_text(text + "\n")
    run.update(lambda data: data.update(supervisor=stale(me).to_record()))
    result = clusterctl("cancel", run.id)
    assert alive(stranger.pid), "cancel signalled a process that is not the run's"
    assert "not signalled" in result.stderr and str(run.node_marker("sft", 0, "pid")) in result.stderr
    assert "is no longer this run's supervisor" in result.stderr
    assert json.loads(clusterctl("status", run.id, "--json").stdout)["stages"]["sft"]["state"] == "CANCELLED"


def test_the_run_s_own_processes_are_stopped(clusterctl, tmp_path):
    """The counterpart: a group whose leader matches its marker is stopped, with its whole group."""
    run_dir = dry_run(clusterctl, tmp_path)
    as_submitted(run_dir, state="RUNNING")
    run = Run(run_dir)
    run.state_dir("sft").mkdir(parents=True)
    ours = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    me = Identity.of(ours.pid)
    run.node_marker("sft", 1, "pid").write_text(f"{me.pid} {socket.gethostname()} {boot_id()} {me.start_ticks}\n")
    try:
        result = clusterctl("cancel", run.id)
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert "not signalled" not in result.stderr
    finally:
        if ours.poll() is None:
            os.killpg(ours.pid, signal.SIGKILL)


def test_a_run_with_a_damaged_run_json_is_still_cancellable(clusterctl, tmp_path):
    yaml = tmp_path / "sleepy.yaml"
    yaml.write_text(json.dumps({"backend": "local", "python": sys.executable,
                                "setup": {"all": ["sleep 300; exit 0"]}}))
    out = json.loads(clusterctl("submit", "sft", "--nodes", "2", "--stages", "sft", "--cluster", yaml,
                                "--detach", "--json").stdout)
    run = Run(out["dir"])
    mark = f"RUN_DIR={run.dir}"
    deadline = time.monotonic() + 60
    while len(processes_with_env(mark)) < 2:
        assert time.monotonic() < deadline, "the nodes never started"
        time.sleep(0.2)
    run.json_path.write_text('{"chain": ["sft"], "stag')
    result = clusterctl("cancel", run.id, check=False)
    assert result.returncode == 2 and f"clusterctl: error: {run.json_path}: is not JSON" in result.stderr
    assert "cancel stopped" in result.stderr
    assert processes_with_env(mark) == [] and processes_with_env(f"CLUSTERCTL_RUN={run.dir}") == []
