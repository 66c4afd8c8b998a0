"""The run folder: one per submission, self-describing (run.json), re-runnable by hand."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError

STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED")


def default_runs_dir() -> Path:
    return Path(os.environ.get("CLUSTERCTL_RUNS", "runs"))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def master_port_for(run_id: str) -> int:
    """A rendezvous port per run, below Linux's ephemeral range (32768+) so no client socket holds it."""
    return 12000 + zlib.crc32(run_id.encode()) % 16000


class Run:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory).resolve()
        self.id = self.dir.name
        self.json_path = self.dir / "run.json"

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def node_script(self, stage: str, rank: int) -> Path:
        return self.stage_dir(stage) / f"node-{rank:03d}.sh"

    def log_dir(self, stage: str) -> Path:
        return self.dir / "logs" / stage

    def log_path(self, stage: str, rank: int) -> Path:
        return self.log_dir(stage) / f"node-{rank:03d}.log"

    def state_dir(self, stage: str) -> Path:
        return self.dir / "state" / stage

    def node_marker(self, stage: str, rank: int, kind: str) -> Path:
        """What a node script records of itself: state/<stage>/node-NNN.pid or .exit."""
        return self.state_dir(stage) / f"node-{rank:03d}.{kind}"

    def read(self) -> dict:
        try:
            return json.loads(self.json_path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.dir} is not a clusterctl run folder (no run.json)") from None

    @contextmanager
    def _locked(self):
        with open(self.dir / "run.json.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write(self, data: dict) -> None:
        with self._locked():
            atomic_write_text(self.json_path, json.dumps(data, indent=2) + "\n")

    def update(self, change) -> dict:
        """Read-modify-write run.json under a lock; `change(data)` edits it in place."""
        with self._locked():
            data = self.read()
            change(data)
            atomic_write_text(self.json_path, json.dumps(data, indent=2) + "\n")
            return data

    def set_stage(self, stage: str, **fields) -> dict:
        def change(data):
            record = data["stages"][stage]
            if fields.get("state") == "RUNNING" and "started" not in record:
                record["started"] = time.time()
            if fields.get("state") in FINISHED and "ended" not in record:
                record["ended"] = time.time()
            record.update(fields)
        return self.update(change)


def recorded_exit(path: Path) -> int | None:
    """The exit code an exit marker (node-NNN.exit, job.exit) holds; None while it is absent or unwritten."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def find_run(runs_dir: str | Path | None, run: str | None) -> Run:
    """A run by id or folder path; the newest run under runs_dir when `run` is None."""
    runs_dir = Path(runs_dir) if runs_dir else default_runs_dir()
    if run and (Path(run) / "run.json").exists():
        return Run(run)
    if run:
        if (runs_dir / run / "run.json").exists():
            return Run(runs_dir / run)
        raise UserError(f"no run {run!r} under {runs_dir.resolve()}",
                        fix="list runs with `ls runs/`, or pass --runs-dir / set CLUSTERCTL_RUNS")
    runs = sorted(p for p in runs_dir.glob("*/run.json")) if runs_dir.is_dir() else []
    if not runs:
        raise UserError(f"no runs under {runs_dir.resolve()}",
                        fix="submit one with `clusterctl submit sft`, or pass --runs-dir")
    return Run(runs[-1].parent)
