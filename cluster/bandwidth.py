"""`clusterctl doctor --bandwidth`: an all-reduce and pairwise bandwidth test across the nodes, run the
way the stages run (paramiko to every host on ssh, one `srun` task per node on Slurm, local processes),
with the cluster's `env:` and `setup:` lines. The node side is clusterctl.training.bandwidth; here:
launching it, and naming the nodes that are much slower than the rest or that never joined.

Why pairs and not only the all-reduce: a ring all-reduce runs at the speed of its slowest link, so
every node reports the same bus bandwidth. Each node's figure is its best pair exchange; a node
whose best pair is far below the median (Settings.slow_below, a fraction of it) has a slow link or
NIC of its own."""
from __future__ import annotations

import json
import secrets
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

MARK = "CLUSTERCTL-BANDWIDTH "


@dataclass
class Settings:
    size_mb: float = 64.0
    iters: int = 5
    join_timeout: float = 60.0
    port: int = 0
    slow_below: float = 0.5       # a node whose best pair is below this fraction of the median is slow


def node_argv(python: str, settings: Settings, *, rank: str, world: int, master: str) -> list[str]:
    return [python, "-m", "clusterctl.training.bandwidth", "--rank", rank, "--world", str(world),
            "--master", master, "--port", str(settings.port), "--size-mb", f"{settings.size_mb:g}",
            "--iters", str(settings.iters), "--join-timeout", f"{settings.join_timeout:g}"]


def shell_prelude(cluster) -> str:
    """What every node script does before its program: the cluster's env exports and setup lines."""
    lines = [f"export {name}={shlex.quote(value)}" for name, value in cluster.env.items()]
    lines += list(cluster.setup.get("all", []))
    return "".join(line + "\n" for line in lines)


def parse(output: str) -> list[dict]:
    rows = []
    for line in output.splitlines():
        if line.startswith(MARK):
            try:
                rows.append(json.loads(line[len(MARK):]))
            except ValueError:
                continue
    return rows


def run_ssh(cluster, hosts: list[str], settings: Settings) -> tuple[list[dict], dict[int, str]]:
    """Every host at once over paramiko; (result rows, {rank: why that host gave none})."""
    from clusterctl.backends.ssh import SshConnector, run_remote
    from clusterctl.errors import UserError

    connector, python = SshConnector(cluster), cluster.node_python or "python3"
    timeout = settings.join_timeout + 600

    def one(rank: int) -> tuple[list[dict], str]:
        argv = node_argv(python, settings, rank=str(rank), world=len(hosts), master=hosts[0])
        command = shell_prelude(cluster) + " ".join(shlex.quote(a) for a in argv)
        try:
            client = connector.connect(hosts[rank])
        except UserError as exc:
            return [], str(exc)
        try:
            code, output = run_remote(client, "bash -c " + shlex.quote(command), timeout=timeout)
        finally:
            client.close()
        rows = parse(output)
        return rows, "" if rows else f"exited {code}: {output.strip()[-300:]}"

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        results = list(pool.map(one, range(len(hosts))))
    return [row for rows, _ in results for row in rows], {r: why for r, (_, why) in enumerate(results) if why}


def run_slurm(cluster, nodes: int, settings: Settings, wait_s: int) -> tuple[list[dict], dict[int, str]]:
    """One srun task per node; rank = SLURM_NODEID, rank 0's address from the job's node list (as the
    SFT batch script does)."""
    python = cluster.node_python or "python3"
    shell_values = {"RANK": '"$SLURM_NODEID"', "MASTER": '"$master"'}
    argv = node_argv(python, settings, rank="RANK", world=nodes, master="MASTER")
    script = (shell_prelude(cluster) + 'master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
              + " ".join(shell_values.get(a) or shlex.quote(a) for a in argv))
    srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--immediate={wait_s}",
            "--job-name=clusterctl-bandwidth", "--kill-on-bad-exit=0"]
    srun += [f"--{k}={v}" for k, v in (("partition", cluster.slurm.partition),
                                        ("account", cluster.slurm.account)) if v]
    if cluster.gpus_per_node:
        srun.append("--gpus-per-node=1")
    try:
        proc = subprocess.run(srun + ["bash", "-c", script], capture_output=True, text=True,
                              timeout=wait_s + settings.join_timeout + 900, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], {0: f"srun failed: {exc}"}
    rows = parse(proc.stdout)
    return rows, {} if rows else {0: f"srun exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}


def run_local(nodes: int, settings: Settings) -> tuple[list[dict], dict[int, str]]:
    """`nodes` processes on this machine over loopback: a check of the program, not of a network."""
    procs = [subprocess.Popen(node_argv(sys.executable, settings, rank=str(r), world=nodes, master="127.0.0.1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
             for r in range(nodes)]
    outputs = [p.communicate()[0] for p in procs]
    rows = [row for output in outputs for row in parse(output)]
    return rows, {r: f"exited {p.returncode}: {out.strip()[-300:]}"
                  for r, (p, out) in enumerate(zip(procs, outputs)) if not parse(out)}


def analyse(rows: list[dict], failures: dict[int, str], names: list[str], slow_below: float = 0.5) -> dict:
    """The verdict per node: bandwidth of its best pair, and ok / SLOW / MISSING / joined (others
    missing) / FAILED, with why.
    `names` are the nodes as cluster.yaml or Slurm call them, by rank (hosts as the nodes report
    themselves fill in where Slurm's order is only known from the run)."""
    full = next((row for row in rows if "allreduce" in row), None)
    missing: list = next((row["missing"] for row in rows if "missing" in row), [])
    errors = {row["rank"]: row["error"] for row in rows if "error" in row}
    world = len(names)
    nodes = []
    best: dict[int, float] = {}
    if full:
        names = [names[r] if names[r] else full["hosts"][r] for r in range(world)]
        for pair in full["pairs"]:
            for rank in (pair["a"], pair["b"]):
                best[rank] = max(best.get(rank, 0.0), pair["bandwidth"])
    median = statistics.median(best.values()) if best else 0.0
    for rank in range(world):
        node = {"rank": rank, "node": names[rank] or f"rank {rank}", "bandwidth": best.get(rank)}
        if rank in missing:
            node.update(status="MISSING", detail=failures.get(rank) or errors.get(rank) or
                        "did not join rank 0 within the join timeout")
        elif missing and rank not in errors:
            node.update(status="joined", detail="not measured: " + ", ".join(names[r] or f"rank {r}" for r in missing)
                        + " did not join")
        elif rank in best and world > 2 and best[rank] < slow_below * median:
            node.update(status="SLOW", detail=f"{best[rank] / median:.1%} of the median {median / 1e9:.3g} GB/s")
        elif rank in best:
            node.update(status="ok", detail="")
        else:
            node.update(status="FAILED", detail=errors.get(rank) or failures.get(rank) or "no result")
        nodes.append(node)
    verdict = {"ok": bool(full) and all(n["status"] == "ok" for n in nodes), "nodes": nodes,
               "median_bandwidth": median}
    if full:
        verdict.update(backend=full["backend"], size=full["size"], busbw=full["allreduce"]["busbw"])
    return verdict


def table(verdict: dict) -> str:
    lines = []
    if "busbw" in verdict:
        lines.append(f"all-reduce of {verdict['size'] / 2**20:g} MiB over {len(verdict['nodes'])} nodes "
                     f"({verdict['backend']}): bus bandwidth {verdict['busbw'] / 1e9:.3g} GB/s")
    rows = [["node", "rank", "best pair GB/s", "status"]]
    for n in verdict["nodes"]:
        figure = f"{n['bandwidth'] / 1e9:.3g}" if n["bandwidth"] is not None else "-"
        rows.append([n["node"], str(n["rank"]), figure, n["status"] + (f": {n['detail']}" if n["detail"] else "")])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[3]]).rstrip() for r in rows]
    if len(verdict["nodes"]) == 2 and "busbw" in verdict:
        lines.append("(two nodes share their one link: a third node is needed to tell which side is slow)")
    return "\n".join(lines)


def check(cluster, *, nodes: int | None, settings: Settings, wait_s: int) -> dict:
    """Run the test on the cluster's nodes and return the verdict (see analyse)."""
    from clusterctl.errors import UserError
    from clusterctl.run import master_port_for

    settings.port = settings.port or cluster.ports.master or master_port_for(secrets.token_hex(4))
    if cluster.backend == "ssh":
        hosts = cluster.hosts[:nodes] if nodes else cluster.hosts
        names = hosts
    else:
        count = nodes or 2
        names = [""] * count
    if len(names) < 2:
        raise UserError("a bandwidth test needs at least 2 nodes", where="--nodes", fix="pass --nodes 2 or more")
    if cluster.backend == "ssh":
        rows, failures = run_ssh(cluster, names, settings)
    elif cluster.backend == "slurm":
        rows, failures = run_slurm(cluster, len(names), settings, wait_s)
    else:
        rows, failures = run_local(len(names), settings)
    return analyse(rows, failures, names, settings.slow_below)
