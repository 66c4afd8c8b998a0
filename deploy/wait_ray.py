"""Readiness gate: wait until the Ray cluster has every node (and GPU) before vLLM starts, or fail
by the deadline naming the nodes that never joined. The published recipe slept 10 s and hoped; a
worker that never joins then shows up as a vLLM placement-group hang an hour later.

    python -m clusterctl.deploy.wait_ray --address HOST:PORT --nodes N [--gpus G] --timeout S [--state-dir DIR]

Nodes are known by their Ray node name, `node-NNN` (the deploy template passes `--node-name`);
with --state-dir the missing ones are shown with the host their node script reported
(state/deploy/node-NNN.pid = "PGID HOSTNAME"). Exit 0 when ready, 1 on timeout, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def node_name(rank: int) -> str:
    return f"node-{rank:03d}"


@dataclass
class RayNode:
    name: str
    address: str
    gpus: float


def gcs_listening(host: str, port: int, timeout: float = 2.0) -> bool:
    """A TCP probe first: Ray's GcsClient blocks ~40 s on an address nobody listens on."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class RayProbe:
    """Alive nodes of a Ray cluster, read from its GCS (no driver job, no worker processes)."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port = address, host, int(port)
        self.client: Any = None             # ray._raylet.GcsClient once the GCS answers

    def alive_nodes(self) -> list[RayNode] | None:
        """None while the GCS does not answer (not started yet, or restarting)."""
        if self.client is None:
            if not gcs_listening(self.host, self.port):
                return None
            from ray._raylet import GcsClient  # Ray's own CLI (`ray status`) reads the GCS this way
            self.client = GcsClient(address=self.address)
        from ray.core.generated.gcs_pb2 import GcsNodeInfo
        try:
            infos = self.client.get_all_node_info(timeout=5).values()
        except Exception:                       # RpcError/GetTimeoutError: retried on the next poll
            self.client = None
            return None
        return [RayNode(info.node_name, info.node_manager_address, float(info.resources_total.get("GPU", 0)))
                for info in infos if info.state == GcsNodeInfo.ALIVE]


def missing_report(nodes: int, gpus: int, alive: list[RayNode] | None, state_dir: Path | None) -> str:
    """What is missing, in words ("" when the cluster is complete)."""
    if alive is None:
        return "the Ray head (GCS) does not answer"
    names = {node.name for node in alive}
    missing = [node_name(rank) for rank in range(nodes) if node_name(rank) not in names]
    problems = []
    if missing:
        problems.append(f"{len(alive)} of {nodes} nodes joined; missing: "
                        + ", ".join(_describe_missing(name, state_dir) for name in missing))
    have_gpus = sum(node.gpus for node in alive)
    if not missing and have_gpus < gpus:
        per_node = ", ".join(f"{node.name} {node.gpus:g}" for node in sorted(alive, key=lambda n: n.name))
        problems.append(f"{have_gpus:g} of {gpus} GPUs registered ({per_node})")
    return "; ".join(problems)


def _describe_missing(name: str, state_dir: Path | None) -> str:
    if state_dir is None:
        return name
    try:
        host = (state_dir / f"{name}.pid").read_text().split()[1]
        return f"{name} (host {host}, started but not joined)"
    except FileNotFoundError:
        return f"{name} (its node script never started)"
    except (OSError, IndexError):
        return name


def wait(address: str, *, nodes: int, gpus: int = 0, timeout: float, state_dir: Path | None = None,
         interval: float = 1.0, out=sys.stdout) -> bool:
    probe = RayProbe(address)
    deadline, last_said = time.monotonic() + timeout, 0.0
    started = time.monotonic()
    while True:
        alive = probe.alive_nodes()
        problem = missing_report(nodes, gpus, alive, state_dir)
        if not problem:
            assert alive is not None        # a Ray that did not answer is a problem
            listing = ", ".join(f"{n.name}@{n.address}" for n in sorted(alive, key=lambda n: n.name))
            print(f"[wait_ray] Ray at {address} is ready after {time.monotonic() - started:.1f} s: "
                  f"{nodes} nodes ({listing}), {sum(n.gpus for n in alive):g} GPUs", file=out, flush=True)
            return True
        now = time.monotonic()
        if now >= deadline:
            print(f"[wait_ray] Ray at {address} not ready after {timeout:g} s: {problem}.\n"
                  "  fix: read the missing nodes' logs (logs/deploy/node-NNN.log); check that they reach "
                  f"{address} and Ray's other ports (firewall), that cluster.yaml `interface:` names the NIC "
                  "the nodes share, and that every node has the same Ray version.", file=out, flush=True)
            return False
        if now - last_said >= 10:
            print(f"[wait_ray] waiting: {problem}", file=out, flush=True)
            last_said = now
        time.sleep(min(interval, max(0.0, deadline - now)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.wait_ray", description=__doc__.split("\n")[0])
    parser.add_argument("--address", required=True, help="the Ray head's HOST:PORT (GCS)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs expected in total (0: do not check)")
    parser.add_argument("--timeout", type=float, required=True, help="seconds")
    parser.add_argument("--state-dir", type=Path, help="the stage's state folder, to name hosts of missing nodes")
    options = parser.parse_args(argv)
    if ":" not in options.address or options.nodes < 1:
        parser.error("--address must be HOST:PORT and --nodes at least 1")
    ready = wait(options.address, nodes=options.nodes, gpus=options.gpus, timeout=options.timeout,
                 state_dir=options.state_dir)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
