"""clusterctl doctor: a preflight over every node of a cluster, before a long job finds out.

One probe (stdlib-only Python, run with the cluster's interpreter on each node, the way the node
scripts will run) reports what the node sees; the checks compare it with this machine and the
cluster.yaml. Reached through the cluster's own backend: paramiko for ssh, `srun` for slurm,
a subprocess for local."""
from __future__ import annotations

import json
import os
import secrets
import sys

import click

from clusterctl.commands import options

PROBE = r"""
import json, os, shutil, socket, subprocess, sys
token_path, token, interface, gpus, ports = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
seen = {"host": socket.gethostname(), "python": sys.executable, "prefix": sys.prefix}
try:
    import clusterctl
    seen["version"] = clusterctl.__version__
except Exception as exc:
    seen["version_error"] = f"{type(exc).__name__}: {exc}"
try:
    with open(token_path) as f:
        seen["shared"] = f.read() == token
except OSError as exc:
    seen["shared"] = False
    seen["shared_error"] = str(exc)
if interface:
    seen["interfaces"] = sorted(os.listdir("/sys/class/net"))
if gpus:
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
        seen["gpus"] = sum(line.startswith("GPU ") for line in out.stdout.splitlines())
        seen["gpu_error"] = out.stderr.strip()[-200:]
    else:
        seen["gpu_error"] = "nvidia-smi not found"
busy = []
for port in [int(p) for p in ports.split(",") if p]:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            busy.append(port)
seen["busy_ports"] = busy
print("CLUSTERCTL-DOCTOR " + json.dumps(seen), flush=True)
"""
def probe_argv(cluster, token_path: str, token: str, ports: list[int]) -> list[str]:
    return [cluster.python_path, "-c", PROBE, token_path, token, interface_of(cluster),
            str(cluster.gpus_per_node), ",".join(map(str, ports))]


def interface_of(cluster) -> str:
    """The NIC NCCL/Gloo will use: `interface:` or NCCL_SOCKET_IFNAME's first name ("" if none or ^excluded)."""
    name = cluster.interface or cluster.env.get("NCCL_SOCKET_IFNAME", "")
    name = name.split(",")[0].lstrip("=")
    return "" if name.startswith("^") else name


def checks(cluster, row: dict, head: bool, ports: list[int], expected_prefix: str) -> dict[str, tuple[bool, str]]:
    """{check: (ok, detail)} for one node's probe result; every node must run in `expected_prefix`."""
    from clusterctl import __version__

    if "error" in row:
        return {"reachable": (False, row["error"])}
    result = {"reachable": (True, row["host"])}
    version = row.get("version")
    result["clusterctl"] = ((True, version) if version == __version__ else
                            (False, row.get("version_error") or f"{version} here {__version__}"))
    result["python"] = ((True, row["prefix"]) if row["prefix"] == expected_prefix else
                        (False, f"{row['python']} runs in {row['prefix']}, not {expected_prefix}"))
    result["shared runs"] = (True, "visible") if row.get("shared") else \
        (False, row.get("shared_error") or "token differs")
    if cluster.gpus_per_node:
        count = row.get("gpus", 0)
        result["gpus"] = ((True, f"{count} GPUs") if count >= cluster.gpus_per_node else
                          (False, row.get("gpu_error") or f"{count} GPUs < gpus_per_node {cluster.gpus_per_node}"))
    name = interface_of(cluster)
    if name:
        present = [i for i in row.get("interfaces", []) if i.startswith(name)]
        result["interface"] = (True, present[0]) if present else \
            (False, f"no {name} (has {', '.join(row.get('interfaces', []))})")
    if head and ports:
        busy = row.get("busy_ports", [])
        result["ports"] = (False, "in use: " + ",".join(map(str, busy))) if busy else \
            (True, ",".join(map(str, ports)))
    return result


def expected_prefix(cluster, results: list[dict]) -> str:
    """The Python environment every node must share: this one when the cluster uses this
    interpreter, else the first node's."""
    if os.path.abspath(cluster.python_path) == os.path.abspath(sys.executable):
        return sys.prefix
    return next((row["prefix"] for row in results if "prefix" in row), "")


FIXES = {
    "reachable": "see the message; `ssh HOST true` / `srun -N1 true` must work from here",
    "clusterctl": "install the same clusterctl on every node (a shared venv is simplest)",
    "python": "set `python:` in cluster.yaml to one environment present on every node (a shared venv)",
    "shared runs": "runs_dir must be one shared folder (NFS/Lustre) mounted at the same path everywhere",
    "gpus": "check the driver (`nvidia-smi`) or lower gpus_per_node",
    "interface": "set `interface:`/NCCL_SOCKET_IFNAME to a NIC every node has (`ip -br link`)",
    "ports": "stop what listens there, or set ports: in cluster.yaml",
}


def table(rows: list[tuple[str, dict]]) -> str:
    names = list(dict.fromkeys(name for _, result in rows for name in result))
    lines = [["node"] + names]
    for target, result in rows:
        lines.append([target] + [("ok" if result[n][0] else "FAIL") if n in result else "-" for n in names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(names) + 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


@click.command("doctor")
@options.cluster_file
@click.option("--nodes", type=click.IntRange(min=1), help="Slurm: nodes to allocate for the probe (default 1); "
                                                          "ssh: the first N hosts (default all).")
@click.option("--wait", "wait_s", type=click.IntRange(min=1), default=120, show_default=True,
              help="Slurm: seconds to wait for the probe's allocation.")
@click.option("--bandwidth", is_flag=True, help="Instead: an all-reduce + pairwise bandwidth test across the "
                                                   "nodes (torch.distributed), naming slow nodes and nodes that "
                                                   "cannot join.")
@click.option("--size-mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
              help="--bandwidth: MiB per all-reduce / pair exchange.")
@click.option("--join-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="--bandwidth: seconds for every node to reach node 0.")
@click.option("--slow-below", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="--bandwidth: a node whose best pair is below this fraction of the median is slow.")
@options.runs_dir
@options.as_json
def command(cluster_file, nodes, wait_s, bandwidth, size_mb, join_timeout, slow_below, runs_dir, as_json):
    """Preflight every node: reachable, same clusterctl and Python, shared run folder visible, GPUs
    (nvidia-smi), the NCCL network interface, free ports on the head node. Non-zero exit on failure.
    With --bandwidth: all-reduce and pairwise bandwidth across the nodes; slow or absent nodes fail."""
    from clusterctl.backends.base import backend_for
    from clusterctl.config import load_cluster
    from clusterctl.submit import runs_root

    cluster = load_cluster(cluster_file)
    if bandwidth:
        from clusterctl.bandwidth import Settings, check
        from clusterctl.bandwidth import table as bandwidth_table
        verdict = check(cluster, nodes=nodes, settings=Settings(size_mb=size_mb, join_timeout=join_timeout,
                                                                   slow_below=slow_below),
                        wait_s=wait_s)
        click.echo(json.dumps(verdict, indent=2) if as_json else bandwidth_table(verdict))
        sys.exit(0 if verdict["ok"] else 1)
    root = runs_root(runs_dir, cluster).resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    token_path = root / f".doctor-{token}"
    token_path.write_text(token)
    ports = [p for p in (cluster.ports.master, cluster.ports.ray, cluster.ports.vllm) if p]
    argv = probe_argv(cluster, str(token_path), token, ports)
    try:
        results = backend_for(cluster).probe(argv, nodes=nodes, wait_s=wait_s)
    finally:
        token_path.unlink(missing_ok=True)
    rows = [(row["target"], checks(cluster, row, index == 0, ports, expected_prefix(cluster, results)))
            for index, row in enumerate(results)]
    failed = [(target, name, detail) for target, result in rows for name, (ok, detail) in result.items() if not ok]
    if as_json:
        click.echo(json.dumps({"ok": not failed, "nodes": [
            {"node": target, "checks": {n: {"ok": ok, "detail": d} for n, (ok, d) in result.items()}}
            for target, result in rows]}, indent=2))
    else:
        click.echo(f"clusterctl doctor: {cluster.backend} backend, {cluster.source}, runs in {root}")
        click.echo(table(rows))
        click.echo(f"node scripts run {cluster.describe_node_python()}")
        for target, name, detail in failed:
            fix = "" if "fix:" in detail else f"\n  fix: {FIXES[name]}"   # a UserError brings its own
            click.echo(f"\n{target}: {name}: {detail}{fix}", err=True)
        click.echo("\nall checks passed" if not failed else f"\n{len(failed)} check(s) failed", err=bool(failed))
    if failed:
        sys.exit(1)

