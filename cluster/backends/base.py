"""The backend interface: where a stage's node scripts run and how a chain of stages is driven.

Two families:
- `Backend` (slurm): the scheduler queues the whole chain; nothing of ours stays alive.
- `SupervisedBackend` (local, ssh): a supervisor process on the submitting machine
  (clusterctl.pipeline) runs the stages in order through three per-node hooks."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

from clusterctl.config import ClusterConfig
from clusterctl.procs import alive
from clusterctl.run import FINISHED, Run


class Backend:
    name = "base"

    def __init__(self, cluster: ClusterConfig):
        self.cluster = cluster

    def hosts(self, nodes: int) -> list[str | None]:
        """The host of each node rank, or None where the scheduler picks it at run time."""
        return [None] * nodes

    def master_addr(self, hosts: list[str | None]) -> str:
        """The rank-0 address baked into node scripts; "" = resolved on the node at run time."""
        return hosts[0] or ""

    def render_extras(self, run: Run, stage: str, context: dict, *, header) -> dict[str, str]:
        """Backend-specific files of a stage ({file name: text}), e.g. job.sbatch or pdsh.sh."""
        return {}

    def submit(self, run: Run, stages: list[str]) -> None:
        raise NotImplementedError

    def refresh(self, run: Run) -> dict:
        """run.json with the stage states brought up to date."""
        return run.read()

    def cancel(self, run: Run) -> None:
        raise NotImplementedError


class NodeProcess:
    """A started node script: `poll()` is None while running, else its exit status."""

    def poll(self) -> int | None:
        raise NotImplementedError


class SupervisedBackend(Backend):
    """Runs the chain through a detached supervisor process (survives the terminal closing)."""

    def check_stage(self, run: Run, stage: str, hosts: list) -> None:
        """Raise UserError if any node cannot run the stage; called before any node starts."""

    def start_node(self, run: Run, stage: str, rank: int, host) -> NodeProcess:
        raise NotImplementedError

    def kill_node(self, run: Run, stage: str, rank: int, host) -> None:
        """Stop the node's whole process group (TERM, then KILL after a grace period)."""
        raise NotImplementedError

    def submit(self, run: Run, stages: list[str]) -> None:
        log = open(run.dir / "logs" / "supervisor.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "clusterctl.pipeline", str(run.dir)], stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=run.dir)
        run.update(lambda data: data.update(supervisor={"pid": process.pid, "started": time.time()}))

    def refresh(self, run: Run) -> dict:
        data = run.read()
        pid = data.get("supervisor", {}).get("pid")
        unfinished = [s for s in data["chain"] if data["stages"][s]["state"] not in FINISHED]
        if pid and unfinished and not alive(pid):
            def change(record):
                for stage in unfinished:
                    if record["stages"][stage]["state"] not in FINISHED:
                        record["stages"][stage].update(
                            state="FAILED", reason="the supervisor process died (see logs/supervisor.log)")
            data = run.update(change)
        return data

    def cancel(self, run: Run) -> None:
        data = run.read()
        pid = data.get("supervisor", {}).get("pid")
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 60
            while alive(pid) and time.time() < deadline:
                time.sleep(0.2)
        # Whatever the supervisor could not stop (or if it was gone): stop it here.
        from clusterctl.pipeline import cancel_remaining
        cancel_remaining(run, self, reason="cancelled by the user")


def backend_for(cluster: ClusterConfig) -> Backend:
    """The backend class of cluster.backend, imported lazily (paramiko only when ssh is used)."""
    module = importlib.import_module(f"clusterctl.backends.{cluster.backend}")
    return module.BACKEND(cluster)
