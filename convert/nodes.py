"""Several nodes converting one checkpoint into one shared staging folder.

Node 0 owns the folder: it prepares it, then admits the other nodes; each node writes the shards
`i % nodes == rank` and reports them done; node 0 waits for every report before writing the index and
swapping the folder in.  Every message is a small file under the staging folder's bookkeeping, keyed by a
random id per process, so files left by an interrupted earlier attempt are never mistaken for this one.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from clusterctl.errors import UserError

from .staging import Staging, write_json

POLL_S = 0.5


def _dir(staging: Staging) -> str:
    return os.path.join(staging.book, "nodes")


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _deadline(timeout: float, what: str, where: str, fix: str):
    end = time.time() + timeout

    def check():
        if time.time() > end:
            raise UserError(f"waited {timeout:.0f} s for {what}", where=where, fix=fix)
        time.sleep(POLL_S)
    return check


def admit(staging: Staging, nodes: int, timeout: float) -> dict[int, str]:
    """Node 0, after preparing: collect a fresh hello from every other node, then let them start."""
    folder = _dir(staging)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):           # an earlier attempt's messages
        if name.endswith(".json"):
            os.unlink(os.path.join(folder, name))
    wait = _deadline(timeout, "the other convert nodes to start", folder,
                     "check that every node of the convert stage is running (their logs)")
    ids: dict[int, str] = {}
    while len(ids) < nodes - 1:
        for rank in range(1, nodes):
            hello = _read(os.path.join(folder, f"hello-{rank}.json"))
            if hello:
                ids[rank] = hello["id"]
        if len(ids) < nodes - 1:
            wait()
    write_json(os.path.join(folder, "go.json"), {str(r): i for r, i in ids.items()})
    return ids


def join(staging: Staging, fingerprint: dict, rank: int, timeout: float) -> str:
    """Other nodes: wait for node 0 to prepare this very conversion and admit us; returns our id."""
    me = uuid.uuid4().hex
    plan = os.path.join(staging.book, "plan.json")
    folder = _dir(staging)
    wait = _deadline(timeout, "node 0 to prepare the output", staging.dir, "check node 0's log")
    while True:
        if _read(plan) == fingerprint and os.path.isdir(folder):
            write_json(os.path.join(folder, f"hello-{rank}.json"), {"id": me})
            if (_read(os.path.join(folder, "go.json")) or {}).get(str(rank)) == me:
                return me
        wait()


def report_done(staging: Staging, me: str, records: dict[str, dict]) -> None:
    write_json(os.path.join(_dir(staging), f"done-{me}.json"), records)


def collect(staging: Staging, ids: dict[int, str], timeout: float) -> dict[str, dict]:
    """Node 0: the shard records of every other node, once each has reported."""
    wait = _deadline(timeout, "the other convert nodes to finish", _dir(staging),
                     "a convert node failed or is slow: see its log; re-running resumes")
    records: dict[str, dict] = {}
    pending = dict(ids)
    while pending:
        for rank, me in list(pending.items()):
            done = _read(os.path.join(_dir(staging), f"done-{me}.json"))
            if done is not None:
                records.update(done)
                del pending[rank]
        if pending:
            wait()
    return records
