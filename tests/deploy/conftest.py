"""Deploy tests: the tiny DeepSeek-V3 folder, deploy scripts rendered by the real renderer, and node
scripts run for real (as the local backend runs them), stopped and cleaned up whatever happens."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.ports import free_port

from clusterctl.backends.base import Backend
from clusterctl.config import ClusterConfig, DeploySpec, JobSpec, Ports
from clusterctl.procs import processes_with_env
from clusterctl.render import render_stage, write_files
from clusterctl.run import Run

SHM_PATTERNS = ("*cpushm*", "psm_*")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from clusterctl.training.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def converted_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model after the real chain: 2 DeepSpeed ZeRO-3 bf16 steps on 2 CPU ranks (as the SFT stage
    lays them out), then the convert stage's `python -m clusterctl.convert` (with its verification)."""
    from tests.convert.conftest import make_checkpoint, run_checked
    work = tmp_path_factory.mktemp("converted")
    checkpoints = make_checkpoint(str(tiny_model), str(work / "checkpoints"), 3, "bf16")
    run_checked([sys.executable, "-m", "clusterctl.convert", "--checkpoint", checkpoints, "--out", str(work / "model")])
    return work / "model"


class HostsBackend(Backend):
    """Renders for named hosts with a given head address (test namespaces, or this machine)."""
    name = "local"

    def __init__(self, cluster: ClusterConfig, hosts: list[str], head: str):
        super().__init__(cluster)
        self._hosts, self._head = hosts, head

    def hosts(self, nodes: int) -> list[str]:
        return self._hosts[:nodes]

    def master_addr(self, hosts) -> str:
        return self._head


def render_deploy(run_dir: Path, *, model: Path, nodes: int = 1, gpus: int = 0, hosts: list[str] | None = None,
                  head: str = "127.0.0.1", ray_port: int = 6379, vllm_port: int = 8000, interface: str = "",
                  ray_temp_dir: str = "/tmp/ray", **spec) -> Run:
    """Write a run folder holding only the deploy stage's scripts; returns the Run. Keep `ray_temp_dir`
    short: Ray's socket paths under it must fit in 107 bytes."""
    cluster = ClusterConfig(gpus_per_node=gpus, python=sys.executable, interface=interface,
                            ray_temp_dir=ray_temp_dir, ports=Ports(ray=ray_port, vllm=vllm_port))
    job = JobSpec(name="tiny", deploy=DeploySpec(nodes=nodes, **{"served_model_name": "tiny-r1", "ready_timeout": 300,
                                                               **spec}))
    run = Run(run_dir)
    backend = HostsBackend(cluster, hosts or ["localhost"] * nodes, head)
    files = render_stage(run, "deploy", cluster=cluster, job=job, backend=backend, master_port=free_port(),
                         overrides={"model": str(model)})
    write_files(run, files)
    return run


class NodeScripts:
    """The deploy node scripts of a run, each started as its own process group (as the local backend does),
    optionally inside a test network namespace (`wrap(rank, argv)`)."""

    def __init__(self, run: Run, nodes: int, wrap=None):
        self.run, self.nodes, self.wrap = run, nodes, wrap or (lambda rank, argv: argv)
        self.procs: dict[int, subprocess.Popen] = {}
        self.shm_before = _shm_entries()

    def start(self, rank: int) -> subprocess.Popen:
        log = self.run.log_path("deploy", rank)
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(self.run.dir)}
        with open(log, "ab") as out:
            self.procs[rank] = subprocess.Popen(
                self.wrap(rank, ["bash", str(self.run.node_script("deploy", rank))]), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.run.dir)
        return self.procs[rank]

    def log(self, rank: int) -> str:
        try:
            return self.run.log_path("deploy", rank).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- node {r} ---\n{self.log(r)[-4000:]}" for r in sorted(self.procs))

    def terminate(self, grace: float = 60.0) -> dict[int, int | None]:
        """SIGTERM each node script's group (a cancel), wait for them; returns the exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {rank: proc.poll() for rank, proc in self.procs.items()}

    def leftovers(self) -> list[int]:
        """Live processes that carry this run's environment (what a clean stop must leave: none)."""
        return processes_with_env(f"RUN_DIR={self.run.dir}")

    def close(self) -> None:
        """Stop everything this run started, whatever state it is in; remove its /dev/shm files."""
        self.terminate(grace=30.0)
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for path in _shm_entries() - self.shm_before:
            if not _mapped(path):
                path.unlink(missing_ok=True)


def _shm_entries() -> set[Path]:
    return {p for pattern in SHM_PATTERNS for p in Path("/dev/shm").glob(pattern)}


def _mapped(path: Path) -> bool:
    """Whether a live process still maps or holds the file (then it is someone else's)."""
    target = str(path)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if target in (entry / "maps").read_text():
                return True
        except OSError:
            continue
    return False
