"""Training that survives a crashed or hung rank: the real trainer (tiny model) on 2 nodes of a real
Slurm cluster and of real sshd hosts. One run per backend takes both faults: `kill -9` of rank 1 after a
checkpoint (a crash: restart 1, resumed at the checkpoint with the same loss), then `SIGSTOP` of rank 1
(a hang: the node's watchdog names it within hang_timeout_s, restart 2); the run then completes with
every step logged once. Unit tests of the watchdog's decisions (training/watchdog.py) come first."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.runs import write_cluster, write_yaml

from clusterctl.errors import ConfigError
from clusterctl.restarts import read_faults, slurm_restart_log
from clusterctl.run import Run
from clusterctl.training import watchdog
from clusterctl.training.config import TrainConfig

HANG_S = 8
MAX_STEPS = 10
JOB = {"name": "faults", "model": "builtin:tiny-deepseek-v3", "data": "builtin:tiny-reasoning",
       "sft": {"nodes": 2, "max_length": 128, "micro_batch": 1, "grad_accum": 1, "max_steps": MAX_STEPS,
               "lr": 1.0e-3, "zero_stage": 2, "offload_optimizer": False, "offload_param": False, "bf16": False,
               "save_steps": 3, "save_total_limit": 1, "hang_timeout_s": HANG_S, "report_to": []}}


# ---- the watchdog's decisions -------------------------------------------------------------------

def beat(rank, step, at, phase="step", pid=None):
    return {"rank": rank, "node": rank, "host": f"h{rank}", "pid": pid or 1000 + rank, "step": step,
            "phase": phase, "time": at}


def test_a_stopped_rank_is_the_hang_not_the_ranks_waiting_on_it():
    beats = {0: beat(0, 7, 100.0), 1: beat(1, 7, 100.5)}
    state = {1000: "S", 1001: "T"}.get
    assert watchdog.find_hang(beats, 105.0, 8, state) is None                       # within the timeout
    fault = watchdog.find_hang(beats, 110.0, 8, state)
    assert (fault["rank"], fault["node"], fault["kind"], fault["certain"]) == (1, 1, "hang", True)
    assert "no step for 10 s after step 7" in fault["cause"] and "stopped (SIGSTOP)" in fault["cause"]
    waiting = watchdog.find_hang(beats, 110.0, 8, lambda pid: "S")                  # nobody stopped: the oldest
    assert waiting["rank"] == 0 and not waiting["certain"] and "still running" in waiting["cause"]
    over = {0: beat(0, 9, 0.0, watchdog.DONE), 1: beat(1, 3, 0.0, watchdog.FAILED)}
    assert watchdog.find_hang(over, 1e9, 8, state) is None                          # finished or failed: no hang


def test_a_crash_names_the_rank_that_died_without_a_word():
    beats = {2: beat(2, 5, 1.0, watchdog.FAILED) | {"error": "RuntimeError: Connection closed by peer"},
             3: beat(3, 5, 1.0)}
    fault = watchdog.explain_crash(beats, 1, 2.0)
    assert (fault["rank"], fault["kind"], fault["certain"]) == (3, "crash", True)
    assert "rank 3 (pid 1003) died without an error after step 5" in fault["cause"]
    del beats[3]
    fault = watchdog.explain_crash(beats, 1, 2.0)
    assert fault["rank"] == 2 and not fault["certain"] and "Connection closed by peer" in fault["cause"]
    assert watchdog.explain_crash({}, 1, 2.0) is None                              # failed while starting
    assert watchdog.explain_crash({0: beat(0, 9, 1.0, watchdog.DONE)}, 1, 2.0) is None


def test_the_watchdog_stops_a_hung_rank_of_its_launcher(tmp_path, monkeypatch):
    """A real launcher whose child rank beats once, then stops itself: the fault is written, the rank
    killed, the launcher ends."""
    rank_code = ("import os, signal; from clusterctl.training import watchdog; watchdog.beat(4); "
                 "os.kill(os.getpid(), signal.SIGSTOP)")
    launcher = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, "
                                                      f"'-c', {rank_code!r}])"],
                                env={**os.environ, "STATE_DIR": str(tmp_path), "RANK": "1", "NODE_RANK": "1"})
    from clusterctl.procs import Identity
    identity = Identity.of(launcher.pid)
    deadline = time.monotonic() + 30
    while not watchdog.heartbeat_path(tmp_path, 1).exists():
        assert time.monotonic() < deadline, "the rank never beat"
        time.sleep(0.05)
    started = time.monotonic()
    watchdog.watch(tmp_path, node=1, per_node=1, launcher=identity, hang_timeout_s=1, poll_s=0.1)
    assert launcher.wait(timeout=15) is not None and time.monotonic() - started < 10
    fault = json.loads(watchdog.fault_path(tmp_path, 1).read_text())
    assert fault["rank"] == 1 and fault["step"] == 4 and "stopped (SIGSTOP)" in fault["cause"]
    assert watchdog.process_state(json.loads(watchdog.heartbeat_path(tmp_path, 1).read_text())["pid"]) is None


def test_the_first_rank_to_vanish_is_the_crash_not_the_siblings_the_launcher_stops(tmp_path):
    """A real launcher with two ranks: rank 1 is SIGKILLed; the launcher, as torchrun does, then stops
    rank 0 (SIGTERM: just as silent). The watchdog saw rank 1 go first, and --explain names it."""
    rank_code = ("import os, sys, time; os.environ['RANK'] = sys.argv[1]; from clusterctl.training import watchdog; "
                 "watchdog.beat(3); time.sleep(60)")
    launcher_code = (f"import subprocess, sys, time; ranks = [subprocess.Popen([sys.executable, '-c', {rank_code!r}, "
                     "str(r)]) for r in (0, 1)]; ranks[1].wait(); time.sleep(0.5); ranks[0].terminate(); ranks[0].wait()")
    env = {**os.environ, "STATE_DIR": str(tmp_path), "NODE_RANK": "0", "NPROC_PER_NODE": "2"}
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], env=env)
    from clusterctl.procs import Identity
    identity = Identity.of(launcher.pid)
    deadline = time.monotonic() + 30
    while len(watchdog.read_beats(tmp_path, range(2))) < 2:
        assert time.monotonic() < deadline, "the ranks never beat"
        time.sleep(0.05)
    import threading
    watcher = threading.Thread(target=watchdog.watch, args=(tmp_path, 0, 2, identity, 60), kwargs={"poll_s": 0.1})
    watcher.start()
    time.sleep(0.3)
    os.kill(watchdog.read_beats(tmp_path, range(2))[1]["pid"], signal.SIGKILL)
    assert launcher.wait(timeout=15) == 0
    watcher.join(timeout=5)
    gone = watchdog.read_gone(tmp_path, 0)
    assert gone[1] < gone.get(0, float("inf")), gone   # rank 0 may end with its launcher, unseen
    explained = subprocess.run([sys.executable, "-m", "clusterctl.training.watchdog", "--explain", "1"], env=env)
    assert explained.returncode == 0                                     # a certain cause: no need to wait
    fault = json.loads(watchdog.fault_path(tmp_path, 0).read_text())
    assert fault["rank"] == 1 and "died without an error after step 3" in fault["cause"], fault


def test_the_rl_kinds_beat_through_their_trainer_callback(tmp_path, monkeypatch):
    """GRPO/DPO/SimPO train through transformers' Trainer: its callback events are their heartbeats."""
    from transformers import TrainerControl, TrainerState

    from clusterctl.training.rl.runner import heartbeat_callback

    monkeypatch.setenv("STATE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    callback, state = heartbeat_callback(), TrainerState(global_step=6)
    callback.on_train_begin(None, state, TrainerControl())
    assert read_beat_in(tmp_path, 3)[:2] == (6, "start")
    state.global_step = 7
    callback.on_step_end(None, state, TrainerControl())
    assert read_beat_in(tmp_path, 3)[:2] == (7, "step")


def read_beat_in(state_dir: Path, rank: int) -> tuple:
    record = json.loads(watchdog.heartbeat_path(state_dir, rank).read_text())
    return record["step"], record["phase"], record["pid"]


def test_faults_and_restart_log_as_the_run_records_them(tmp_path):
    run = Run(tmp_path)
    state = run.state_dir("sft")
    state.mkdir(parents=True)
    watchdog.record_fault(state, 0, beat(0, 5, 1.0) | {"cause": "crash: rank 0 failed", "certain": False})
    watchdog.record_fault(state, 1, beat(1, 5, 2.0) | {"cause": "crash: rank 1 died", "certain": True})
    assert not watchdog.record_fault(state, 1, {"cause": "later"})          # the first cause stays
    assert [f["cause"] for f in read_faults(run, "sft")] == ["crash: rank 1 died", "crash: rank 0 failed"]
    lines = [json.dumps({"restart": 1, "time": 5, "job_id": "7", "faults": read_faults(run, "sft")}),
             '{"restart": 2, "time": 9, "job_id": "7", "faults": [{"kind": "time_limit", "cause": "time limit']
    (state / "restarts.jsonl").write_text("\n".join(lines) + "\n")          # the second cut short
    log = slurm_restart_log(run, "sft")
    assert len(log) == 1 and (log[0]["cause"], log[0]["node"], log[0]["rank"]) == ("crash: rank 1 died", 1, 1)


@pytest.mark.parametrize("field", ["hang_timeout_s", "collective_timeout_s"])
def test_timeouts_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"{field}.*above 0"):
        TrainConfig.from_dict({field: 0})


# ---- both faults on real clusters ---------------------------------------------------------------

def until(check, timeout: float, what: str, run_dir: Path):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            from fixtures.runs import logs_of
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + logs_of(run_dir, 30))
        time.sleep(0.05)
    return found


def read_beat(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads(watchdog.heartbeat_path(run_dir / "state/sft", rank).read_text())
    except (OSError, ValueError):
        return None


def complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "sft/checkpoints").glob("step-*/clusterctl-complete.json"))


def metrics(run_dir: Path) -> dict[int, float]:
    path = run_dir / "sft/metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {line["step"]: line["loss"] for line in lines}


def kill_then_stop(clusterctl, run_id: str, run_dir: Path, resume, env=None) -> None:
    """The two faults on rank 1 (node 1), then the checks; `resume(n)` lets a requeued job start."""
    def stage() -> dict:
        return json.loads(clusterctl("status", run_id, "--json", env=env).stdout)["stages"]["sft"]

    stopped = None
    try:
        # 1. kill -9 once a checkpoint is complete and rank 1 has stepped past it
        first = until(lambda: (b := read_beat(run_dir, 1)) and b["phase"] == "step" and complete_steps(run_dir)
                      and b["step"] > complete_steps(run_dir)[-1] and b, 300, "a step after a checkpoint", run_dir)
        checkpoint, before = complete_steps(run_dir)[-1], metrics(run_dir)
        os.kill(first["pid"], signal.SIGKILL)
        until(lambda: len(stage().get("restart_log", [])) >= 1, 120, "restart 1", run_dir)
        resume(1)
        # 2. SIGSTOP once the second attempt has made two steps
        second = until(lambda: (b := read_beat(run_dir, 1)) and b["pid"] != first["pid"] and b["phase"] == "step"
                       and b["step"] >= checkpoint + 2 and b, 300, "the second attempt's steps", run_dir)
        stopped, stopped_at = second["pid"], time.time()
        os.kill(stopped, signal.SIGSTOP)
        until(lambda: len(stage().get("restart_log", [])) >= 2, HANG_S + 60, "restart 2", run_dir)
        resume(2)
        final = until(lambda: (s := stage())["state"] in ("COMPLETED", "FAILED", "CANCELLED") and s, 300,
                      "the run to finish", run_dir)
    finally:
        clusterctl("cancel", run_id, check=False, env=env)
        if stopped and watchdog.process_state(stopped) == "T":   # the watchdog failed: leave nothing stopped
            os.kill(stopped, signal.SIGKILL)
    assert final["state"] == "COMPLETED" and final["restarts"] == 2, final
    crash, hang = final["restart_log"]
    assert (crash["node"], crash["rank"]) == (1, 1) and crash["cause"].startswith("crash: rank 1 "), crash
    assert "died without an error" in crash["cause"]
    assert (hang["node"], hang["rank"]) == (1, 1) and "stopped (SIGSTOP)" in hang["cause"], hang
    noticed = next(f for f in hang["faults"] if f["node"] == 1)["time"] - stopped_at
    assert HANG_S - 2 <= noticed <= HANG_S + 5, noticed   # its last step came a moment before the SIGSTOP
    resumed = [line for line in (run_dir / "logs/sft/node-000.log").read_text().splitlines() if "resumed from" in line]
    assert resumed[0].endswith(f"at step {checkpoint}"), resumed          # the last complete checkpoint
    after = metrics(run_dir)
    assert sorted(after) == list(range(1, MAX_STEPS + 1))                # every step once: it continued at N+1
    if checkpoint + 1 in before:                                         # the same loss as before the crash
        assert after[checkpoint + 1] == pytest.approx(before[checkpoint + 1], rel=1e-4)
    text = clusterctl("status", run_id, env=env).stdout
    assert "restart 1 at" in text and "restart 2 at" in text and "hang: rank 1" in text, text


@pytest.mark.timeout(600)
def test_slurm_restarts_after_a_crash_and_a_hang(clusterctl, tmp_path):
    from fixtures.slurm_cluster import SlurmCluster

    with SlurmCluster(nodes=2, gpus_per_node=0) as slurm:
        env = {"SLURM_CONF": slurm.conf}
        cluster = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "slurm": {
            "partition": slurm.partition, "time": "10:00", "max_restarts": 2}})
        run_id, run_dir = _submit(clusterctl, cluster, tmp_path, env)
        job_id = json.loads((run_dir / "run.json").read_text())["stages"]["sft"]["job_id"]

        def show() -> dict:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm.env, capture_output=True,
                                 text=True, timeout=30).stdout
            return dict(field.split("=", 1) for field in out.split() if "=" in field)

        def resume(restart: int) -> None:
            """A requeued job waits (BeginTime) before it may start again: sooner, here. Not at once: slurmd
            refuses a credential issued in the second it revoked the last one (as in test_slurm.py)."""
            until(lambda: show().get("JobState") == "PENDING" and show().get("Restarts") == str(restart),
                  60, f"requeue {restart}", run_dir)
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm.env, check=True,
                           timeout=30)

        kill_then_stop(clusterctl, run_id, run_dir, resume, env=env)


def _submit(clusterctl, cluster: str, tmp_path: Path, env=None):
    out = json.loads(clusterctl("submit", "sft", "--stages", "sft", "--cluster", cluster, "--job",
                                write_yaml(tmp_path / "job.yaml", JOB), "--json", env=env).stdout)
    return out["run"], Path(out["dir"])


@pytest.mark.timeout(600)
def test_ssh_restarts_after_a_crash_and_a_hang(clusterctl, tmp_path):
    from fixtures.ssh_hosts import SshHosts

    with SshHosts(2) as hosts:
        cluster = write_cluster(tmp_path / "cluster.yaml", {
            "backend": "ssh", "hosts": [hosts.hostlist()],
            "ssh": {"user": hosts.user, "identity_file": hosts.identity_file, "known_hosts": hosts.known_hosts,
                    "max_restarts": 2}})
        run_id, run_dir = _submit(clusterctl, cluster, tmp_path)
        kill_then_stop(clusterctl, run_id, run_dir, resume=lambda restart: None)
