"""The local backend: each "node" is a process group on this machine (laptops, CI, the tests)."""
from __future__ import annotations

import subprocess

from clusterctl.backends.base import NodeProcess, SupervisedBackend
from clusterctl.procs import Identity, processes_with_env, stop_processes
from clusterctl.run import Run


class LocalNode(NodeProcess):
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def poll(self) -> int | None:
        return self.process.poll()


class LocalBackend(SupervisedBackend):
    name = "local"
    follows_in_foreground = True   # the embedded default: nothing else would show its progress

    def hosts(self, nodes: int) -> list[str | None]:
        return ["localhost"] * nodes

    def master_addr(self, hosts) -> str:
        return "127.0.0.1"

    def start_node(self, run: Run, stage: str, rank: int, host) -> LocalNode:
        log_path = run.log_path(stage, rank)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(["bash", str(run.node_script(stage, rank))], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                       cwd=run.dir)
        return LocalNode(process)

    def kill_node(self, run: Run, stage: str, rank: int, host, grace: float = 10.0) -> str:
        """TERM the node's group and every process that carries its identity, KILL what outlives the grace."""
        pgid, refused = node_group(run, stage, rank)
        stop_processes(lambda: _node_processes(run, stage, rank, pgid), grace)
        return refused


def node_group(run: Run, stage: str, rank: int) -> tuple[int | None, str]:
    """(the node's process group if its pid marker names one of ours still running, why it was refused)."""
    path = run.node_marker(stage, rank, "pid")
    try:
        text = path.read_text()
    except OSError:
        return None, ""
    identity = Identity.from_pid_file(text)
    if identity is None:
        return None, f"{path} does not say which process it is (pgid, host, boot id, start time): not signalled"
    if identity.running():
        return identity.pid, ""
    refusal = identity.refusal(f"node {rank} of {stage}")
    return None, f"{path}: {refusal}" if refusal else ""


def _node_processes(run: Run, stage: str, rank: int, pgid: int | None) -> list[int]:
    """Processes of one node: its (verified) process group plus any descendant that left the group (same env)."""
    return processes_with_env(f"RUN_DIR={run.dir}", f"STAGE={stage}", f"NODE_RANK={rank}", pgid=pgid)


BACKEND = LocalBackend
