"""The run folder: one per submission, self-describing (run.json), re-runnable by hand.

Stage states change only through Run's named transitions (queue, start, finish, fail, cancel,
reset), all of which go through `transition`: it stamps the start and end times and keeps the
first end a stage reaches (a late report cannot turn CANCELLED into COMPLETED)."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError

STAGE_NAMES = ("sft", "grpo", "dpo", "simpo", "ppo", "convert", "deploy")


class StageState(str, Enum):
    """A stage's state in run.json (stored as its name; compares equal to it)."""
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:   # as StrEnum (3.11+) prints it: the name run.json holds
        return self.value

    @property
    def finished(self) -> bool:
        return self in (StageState.COMPLETED, StageState.FAILED, StageState.CANCELLED)


FINISHED = frozenset(state for state in StageState if state.finished)
STATES = tuple(state.value for state in StageState)


def default_runs_dir() -> Path:
    return Path(os.environ.get("CLUSTERCTL_RUNS", "runs"))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def master_port_for(run_id: str) -> int:
    """A rendezvous port per run, below Linux's ephemeral range (32768+) so no client socket holds it."""
    return 12000 + zlib.crc32(run_id.encode()) % 16000


def transition(record: dict, state: StageState | str | None = None, **fields) -> bool:
    """Apply one change to a stage record; False (nothing changed) when it would move a finished
    stage, whose end is final until `Run.reset`."""
    current = StageState(record["state"])
    if state is None:
        if not current.finished:
            record.update(fields)
        return not current.finished
    state = StageState(state)
    if current.finished:
        return False
    now = time.time()
    if state is StageState.RUNNING:
        record.setdefault("started", now)
    if state.finished:
        record.setdefault("ended", now)
    record.update(fields, state=state.value)
    if state.finished and record.get("node_states"):
        # A node still shown running when its stage ends was stopped with it (or ended unrecorded).
        leftover = StageState.COMPLETED if state is StageState.COMPLETED else StageState.CANCELLED
        record["node_states"] = {rank: node if StageState(node).finished else leftover.value
                                 for rank, node in record["node_states"].items()}
    return True


class RunFileError(UserError):
    """run.json (or another file of the run folder) cannot be read as clusterctl wrote it."""

    def __init__(self, path: Path, problem: str, *, fix: str | None = None):
        super().__init__(problem, where=str(path), fix=fix or (
            f"restore it from a backup, or remove the run folder {path.parent} if the run is over; "
            f"`clusterctl cancel {path.parent.name}` still stops its processes/jobs"))


def check_run_data(data, path: Path) -> dict:
    """run.json's shape as clusterctl writes it; RunFileError naming the first field that is not."""
    if not isinstance(data, dict):
        raise RunFileError(path, f"holds a JSON {type(data).__name__}, not an object")
    for key, kind in (("chain", list), ("stages", dict), ("backend", str)):
        if not isinstance(data.get(key), kind):
            raise RunFileError(path, f"field {key!r} is missing or not a {kind.__name__}")
    for stage in data["chain"]:
        record = data["stages"].get(stage) if isinstance(stage, str) else None
        if stage not in STAGE_NAMES or not isinstance(record, dict):
            raise RunFileError(path, f"chain names {stage!r}, which has no record under 'stages'")
        if record.get("state") not in StageState.__members__:
            raise RunFileError(path, f"stages.{stage}.state is {record.get('state')!r}, not one of "
                                     f"{', '.join(StageState)}")
        if not isinstance(record.get("nodes", 1), int) or not isinstance(record.get("hosts", []), list):
            raise RunFileError(path, f"stages.{stage}.nodes/hosts have the wrong type")
        for key in ("job_id", "endpoint", "reason", "output"):
            if not isinstance(record.get(key, ""), str):
                raise RunFileError(path, f"stages.{stage}.{key} is not text")
        node_states = record.get("node_states", {})
        if not isinstance(node_states, dict) or any(s not in StageState.__members__ for s in node_states.values()):
            raise RunFileError(path, f"stages.{stage}.node_states is not a map of node rank to state")
    return data


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
        """run.json, checked to have the shape clusterctl writes (RunFileError otherwise)."""
        try:
            text = self.json_path.read_bytes().decode()
        except FileNotFoundError:
            raise UserError(f"{self.dir} is not a clusterctl run folder (no run.json)") from None
        except OSError as exc:
            raise RunFileError(self.json_path, f"cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise RunFileError(self.json_path, f"is not UTF-8 text (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problem = "is empty" if not text.strip() else f"is not JSON (line {exc.lineno}: {exc.msg})"
            raise RunFileError(self.json_path, problem + ": truncated or corrupted") from None
        except RecursionError:
            raise RunFileError(self.json_path, "is nested too deeply to be clusterctl's") from None
        return check_run_data(data, self.json_path)

    @contextmanager
    def _locked(self):
        with open(self.dir / "run.json.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def write(self, data: dict) -> None:
        with self._locked():
            atomic_write_text(self.json_path, json.dumps(data, indent=2) + "\n")

    def update(self, change: Callable[[dict], object]) -> dict:
        """Read-modify-write run.json under a lock; `change(data)` edits it in place."""
        with self._locked():
            data = self.read()
            change(data)
            atomic_write_text(self.json_path, json.dumps(data, indent=2) + "\n")
            return data

    def apply(self, changes: dict[str, dict]) -> dict:
        """Several stages' transitions in one write: {stage: {"state": ..., other fields}}."""
        def change(data):
            for stage, fields in changes.items():
                transition(data["stages"][stage], **fields)
        return self.update(change)

    def _one(self, stage: str, state: StageState | None, **fields) -> dict:
        return self.apply({stage: dict(fields, state=state)})

    def queue(self, stage: str, job_id: str) -> dict:
        """Handed to a scheduler, which starts it later."""
        return self._one(stage, StageState.PENDING, job_id=job_id, submitted=time.time())

    def start(self, stage: str, **fields) -> dict:
        return self._one(stage, StageState.RUNNING, **fields)

    def note(self, stage: str, **fields) -> dict:
        """Fields of an unfinished stage that are not a state change (node states, endpoint)."""
        return self._one(stage, None, **fields)

    def finish(self, stage: str, **fields) -> dict:
        return self._one(stage, StageState.COMPLETED, exit_code=0, **fields)

    def fail(self, stage: str, reason: str, **fields) -> dict:
        return self._one(stage, StageState.FAILED, reason=reason, **fields)

    def cancel(self, stages: Iterable[str], reason: str) -> dict:
        """Every unfinished stage of `stages` CANCELLED (finished ones keep their end)."""
        return self.apply({stage: {"state": StageState.CANCELLED, "reason": reason} for stage in stages})

    def reset(self, stages: list[str]) -> dict:
        """`retry`: the chain becomes `stages`, each PENDING again, keeping only where it runs and writes."""
        def change(data):
            data["chain"], data["dry_run"] = stages, False
            for stage in stages:
                old = data["stages"][stage]
                data["stages"][stage] = {"state": StageState.PENDING.value,
                                         **{k: v for k, v in old.items() if k in ("nodes", "hosts", "output")},
                                         **({"endpoint": ""} if stage == "deploy" else {})}
        return self.update(change)


def unfinished(data: dict) -> list[str]:
    """The stages of run.json's chain that have not ended."""
    return [stage for stage in data["chain"] if data["stages"][stage]["state"] not in FINISHED]


def recorded_exit(path: Path) -> int | None:
    """The exit code an exit marker (node-NNN.exit, job.exit) holds; None while it is absent or unwritten."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def recorded_endpoint(run: Run) -> dict:
    """run.json's fields for the endpoint the deploy head recorded in state/deploy/endpoint.json;
    {} until it exists. A file that is not the deploy head's is an error naming it."""
    path = run.state_dir("deploy") / "endpoint.json"
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        raise _bad_endpoint(path, f"cannot be read as JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("url"), str) \
            or not isinstance(record.get("model", ""), str):
        raise _bad_endpoint(path, 'is not {"url": "http://...", "model": "..."}')
    return {"endpoint": record["url"], "served_model": record.get("model")}


def _bad_endpoint(path, problem: str) -> UserError:
    return UserError(problem, where=str(path),
                     fix="the deploy head writes it once vLLM answers; remove it and `clusterctl retry` the "
                         "deploy stage, or pass the URL to `clusterctl health`")


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
    # `.<id>.partial` is a run folder being written (or left by a crash): not a run yet.
    runs = sorted(p for p in runs_dir.glob("[!.]*/run.json")) if runs_dir.is_dir() else []
    if not runs:
        raise UserError(f"no runs under {runs_dir.resolve()}",
                        fix="submit one with `clusterctl submit sft`, or pass --runs-dir")
    return Run(runs[-1].parent)
