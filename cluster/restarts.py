"""Automatic restarts of a training stage after a crash or a hang, as the run records them.

The nodes name what went wrong in state/<stage>/node-NNN.fault (training/watchdog.py). A stage whose
nodes left a fault is restarted while its budget lasts (slurm.max_restarts: the batch script requeues
the job and appends one line per restart to state/<stage>/restarts.jsonl; ssh.max_restarts: the
supervisor starts the stage again). Either way run.json's stage record holds `restarts` (the count)
and `restart_log` ([{"restart", "time", "cause", "node", "host", "rank", "faults"}]), which `status` shows."""
from __future__ import annotations

import json

from clusterctl.run import Run

RESTART_LOG = "restarts.jsonl"


def read_faults(run: Run, stage: str) -> list[dict]:
    """The nodes' fault records, the likeliest cause first: a rank that is itself broken (it died
    without a word, or is stopped) before ranks that failed or waited because of it, then by time."""
    found = []
    for path in sorted(run.state_dir(stage).glob("node-*.fault")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("cause"), str):
            found.append(record)
    return likeliest_first(found)


def likeliest_first(faults: list[dict]) -> list[dict]:
    return sorted(faults, key=lambda f: (not f.get("certain", False), f.get("time", 0)))


def entry(number: int, when: float, faults: list[dict], **extra) -> dict:
    """One restart: its number, time, the first cause (node, host, rank) and every node's fault."""
    faults = likeliest_first(faults)
    first = faults[0] if faults else {"cause": "unknown"}
    return {"restart": number, "time": when, "cause": first["cause"],
            **{k: first[k] for k in ("node", "host", "rank") if k in first}, "faults": faults, **extra}


def slurm_restart_log(run: Run, stage: str) -> list[dict]:
    """The restarts the batch script recorded: one JSON line each, {"restart", "time", "job_id", "faults"}."""
    try:
        lines = (run.state_dir(stage) / RESTART_LOG).read_text().splitlines()
    except OSError:
        return []
    log = []
    for line in lines:
        try:
            record = json.loads(line)
            log.append(entry(int(record["restart"]), float(record["time"]), list(record.get("faults") or []),
                             job_id=str(record.get("job_id", ""))))
        except (ValueError, KeyError, TypeError):
            continue   # a line cut short by a node that died while writing it
    return log


def describe(record: dict) -> str:
    """One line per restart for `status`."""
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("time", 0)))
    where = f" (node {record['node']}, {record.get('host', '?')})" if "node" in record else ""
    return f"restart {record.get('restart', '?')} at {when}: {record.get('cause', 'unknown')}{where}"
