"""The backend interface: where a stage's node scripts run and how a chain of stages is driven.

Two families:
- `Backend` (slurm): the scheduler queues the whole chain; nothing of ours stays alive.
- `SupervisedBackend` (local, ssh): a supervisor process on the submitting machine
  (clusterctl.pipeline) runs the stages in order through three per-node hooks."""
from __future__ import annotations

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from clusterctl.config import ClusterConfig, load_cluster_snapshot
from clusterctl.errors import UserError
from clusterctl.procs import Identity, processes_with_env, stop_processes
from clusterctl.run import Run, RunFileError, StageState, unfinished

SUPERVISOR_STOP_S = 60
RUN_MARK = "CLUSTERCTL_RUN"   # in the environment of the supervisor and every local process it starts


class Backend:
    name = "base"
    follows_in_foreground = False   # `submit` follows the run in the terminal until the endpoint answers

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster

    def hosts(self, nodes: int) -> list[str | None]:
        """The host of each node rank, or None where the scheduler picks it at run time."""
        return [None] * nodes

    def master_addr(self, hosts: list[str | None]) -> str:
        """The rank-0 address baked into node scripts."""
        return hosts[0] or ""

    def master_addr_setup(self, hosts: list[str | None]) -> str:
        """The node script's shell lines that export MASTER_ADDR (a scheduler may resolve it at run time)."""
        return f"export MASTER_ADDR={shlex.quote(self.master_addr(hosts))}"

    def render_extras(self, run: Run, stage: str, context: dict, *, header) -> dict[str, str]:
        """Backend-specific files of a stage ({file name: text}), e.g. job.sbatch or pdsh.sh."""
        return {}

    def submit(self, run: Run, stages: list[str]) -> None:
        raise NotImplementedError

    def refresh(self, run: Run) -> dict:
        """run.json with the stage states brought up to date."""
        return run.read()

    def cancel(self, run: Run) -> list[str]:
        """Stop every unfinished stage and record them CANCELLED; returns what was refused (not ours)."""
        raise NotImplementedError

    def probe(self, argv: list[str], *, nodes: int | None, wait_s: int) -> list[dict]:
        """Run `clusterctl doctor`'s probe (argv) where the stages would run: one row per node, its
        PROBE_MARK line as a dict plus "target", or {"target", "error"} for a node that did not answer.
        `nodes`: how many (default: the backend's own choice); `wait_s`: for a scheduler's allocation."""
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                                  check=False)
        except OSError as exc:
            return [{"target": "localhost", "error": f"{argv[0]}: {exc}"}]
        found = parse_probes(proc.stdout)
        return [{"target": "localhost", **found[0]}] if found else \
            [{"target": "localhost", "error": f"probe exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}]

    def cancel_unreadable(self, run: Run) -> int:
        """Stop what the run started when run.json cannot be read, from the run folder alone; the count."""
        raise NotImplementedError


PROBE_MARK = "CLUSTERCTL-DOCTOR "   # the line doctor's probe prints, then its findings as JSON


def parse_probes(output: str) -> list[dict]:
    return [json.loads(line[len(PROBE_MARK):]) for line in output.splitlines() if line.startswith(PROBE_MARK)]


class NodeProcess:
    """A started node script: `poll()` is None while running, else its exit status."""

    def poll(self) -> int | None:
        raise NotImplementedError


class SupervisedBackend(Backend):
    """Runs the chain through a detached supervisor process (survives the terminal closing)."""

    max_restarts = 0   # restarts of a training stage whose node crashed or hung (clusterctl.restarts)

    def check_stage(self, run: Run, stage: str, hosts: list) -> None:
        """Raise UserError if any node cannot run the stage; called before any node starts."""

    def start_node(self, run: Run, stage: str, rank: int, host) -> NodeProcess:
        raise NotImplementedError

    def kill_node(self, run: Run, stage: str, rank: int, host) -> str:
        """Stop the node's whole process group (TERM, then KILL after a grace period), if its pid marker
        names a process of ours; else leave it alone and say why ("" when nothing was refused)."""
        raise NotImplementedError

    def submit(self, run: Run, stages: list[str]) -> None:
        with open(run.dir / "logs" / "supervisor.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "clusterctl.pipeline", str(run.dir)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run.dir,
                env={**os.environ, RUN_MARK: str(run.dir)})
        identity = Identity.of(process.pid)
        record = {"pid": process.pid, "started": time.time(), **(identity.to_record() if identity else {})}
        run.update(lambda data: data.update(supervisor=record))

    def refresh(self, run: Run) -> dict:
        """A supervisor that is gone (or replaced by another process with its pid) while stages are
        unfinished died without recording their end: they are FAILED now."""
        data = run.read()
        supervisor = data.get("supervisor") or {}
        stages = unfinished(data)
        if supervisor.get("pid") and stages and _supervisor_gone(supervisor):
            data = run.apply({stage: {"state": StageState.FAILED, "reason": "the supervisor process died "
                                      "(see logs/supervisor.log)"} for stage in stages})
        return data

    def cancel(self, run: Run) -> list[str]:
        """TERM the supervisor (it stops the nodes and records the end), then stop whatever it left.
        Returns what was refused: a recorded pid that is no longer ours is never signalled."""
        data = run.read()
        refused = []
        identity = Identity.from_record(data.get("supervisor"))
        if identity is not None and identity.running():
            os.kill(identity.pid, signal.SIGTERM)
            deadline = time.time() + SUPERVISOR_STOP_S
            while identity.running() and time.time() < deadline:
                time.sleep(0.2)
        elif identity is not None and identity.refusal("this run's supervisor"):
            refused.append(identity.refusal("this run's supervisor"))
        elif data.get("supervisor") and identity is None:
            refused.append(f"run.json's supervisor record {data['supervisor']!r} does not say which process "
                           "it is (pid, host, boot id, start time): not signalled")
        # Whatever the supervisor could not stop (or if it was gone): stop it here.
        from clusterctl.pipeline import cancel_remaining
        return refused + cancel_remaining(run, self, reason="cancelled by the user")


    def cancel_unreadable(self, run: Run) -> int:
        """The supervisor and local nodes carry RUN_MARK; remote nodes are named by their pid markers
        (rank R of a stage runs on the R-th host, as at submission)."""
        stopped = stop_processes(lambda: processes_with_env(f"{RUN_MARK}={run.dir}"), grace=10.0)
        for pid_file in sorted(run.dir.glob("state/*/node-*.pid")):
            rank = int(pid_file.stem.split("-")[1])
            if not pid_file.with_suffix(".exit").exists():
                stopped += not self.kill_node(run, pid_file.parent.name, rank, self.hosts(rank + 1)[rank])
        return stopped


def _supervisor_gone(record: dict) -> bool:
    identity = Identity.from_record(record)
    return identity.gone() if identity else False


def backend_for(cluster: ClusterConfig) -> Backend:
    """The backend class of cluster.backend, imported lazily (paramiko only when ssh is used)."""
    module = importlib.import_module(f"clusterctl.backends.{cluster.backend}")
    return module.BACKEND(cluster)


def backend_of(run: Run) -> Backend:
    """A run's backend: the one run.json names, configured by the run's cluster.yaml snapshot."""
    cluster = load_cluster_snapshot(run.dir / "cluster.yaml")
    try:
        named = run.read()["backend"]
    except RunFileError:
        named = cluster.backend   # a corrupt run.json must not stop `cancel`
    if named != cluster.backend:
        raise UserError(f"run.json names the {named} backend but its cluster.yaml the {cluster.backend} backend",
                        where=str(run.json_path), fix="restore the run folder's cluster.yaml or run.json")
    return backend_for(cluster)
