"""The local backend: each "node" is a process group on this machine (laptops, CI, the tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from clusterctl.backends.base import NodeProcess, SupervisedBackend
from clusterctl.procs import processes_with_env
from clusterctl.run import Run


class LocalNode(NodeProcess):
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def poll(self) -> int | None:
        return self.process.poll()


class LocalBackend(SupervisedBackend):
    name = "local"

    def hosts(self, nodes: int) -> list[str]:
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

    def kill_node(self, run: Run, stage: str, rank: int, host, grace: float = 10.0) -> None:
        """TERM the node's group and every process that carries its identity, KILL what outlives the grace."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            pids = _node_processes(run, stage, rank)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids and time.time() < deadline:
                pids = _node_processes(run, stage, rank)
                time.sleep(0.1)
            if not pids:
                return


def _node_processes(run: Run, stage: str, rank: int) -> list[int]:
    """Processes of one node: its process group plus any descendant that left the group (same env)."""
    pid_file = run.node_marker(stage, rank, "pid")
    try:
        pgid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pgid = None
    return processes_with_env(f"RUN_DIR={run.dir}", f"STAGE={stage}", f"NODE_RANK={rank}", pgid=pgid)


BACKEND = LocalBackend
