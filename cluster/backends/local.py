"""The local backend: each "node" is a process group on this machine (laptops, CI, the tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from clusterctl.backends.base import NodeProcess, SupervisedBackend
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
    pid_file = run.state_dir(stage) / f"node-{rank:03d}.pid"
    pgid = None
    if pid_file.exists():
        try:
            pgid = int(pid_file.read_text().split()[0])
        except (ValueError, IndexError):
            pgid = None
    marks = (f"RUN_DIR={run.dir}".encode(), f"STAGE={stage}".encode(), f"NODE_RANK={rank}".encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if pgid is not None and os.getpgid(int(entry.name)) == pgid:
                found.append(int(entry.name))
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if all(mark in environ for mark in marks):
            found.append(int(entry.name))
    return [pid for pid in found if _not_zombie(pid)]


def _not_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


BACKEND = LocalBackend
