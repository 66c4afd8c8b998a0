"""Crashes and hangs of a training node, noticed on the node and named by rank.

Rank side: every rank writes a heartbeat, state/<stage>/rank-RRRRR.beat ({"rank", "pid", "step",
"phase", "time", ...}), when it starts stepping, after every optimizer step, when it is done, and when an
exception ends it (`beat`, `noting_failures`). Nothing is written without the node script's
STATE_DIR and torchrun's RANK in the environment.

Node side (`python -m clusterctl.training.watchdog`, started by the node script beside the launcher):
- `watch`: a rank whose step has not advanced for hang_timeout_s (the clock starts at its first
  heartbeat, after model load) is a hang. The watchdog writes state/<stage>/node-NNN.fault, then
  SIGKILLs the node's ranks (only children of the launcher it was given, whose identity it checked
  when it started) and, if the launcher outlives them, the launcher.
- `--explain RC`: after the launcher exited with RC, and no hang was recorded, name the crash: the first
  rank that vanished without a word (SIGKILL, segfault, the OOM killer; the watchdog notes when each
  rank's process disappears, in node-NNN.gone), else one that raised.
A fault is recorded only once the node's ranks had started stepping: a run that fails while it
starts (bad config, missing file) fails the same way again and is not restarted.
The fault file is what the Slurm batch script and the supervisor read to restart the stage."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

DEFAULT_HANG_TIMEOUT_S = 900.0
POLL_S = 0.5
LAUNCHER_GRACE_S = 10.0
DONE, FAILED = "done", "failed"
PID_POLL_S = 0.1       # how often the watchdog looks for a vanished rank (local /proc only)
UNCERTAIN_EXIT = 3   # --explain: this node's ranks only waited on, or failed after, another node's

_heart: dict = {}


def heartbeat_path(state_dir: Path, rank: int) -> Path:
    return Path(state_dir) / f"rank-{rank:05d}.beat"


def fault_path(state_dir: Path, node: int) -> Path:
    return Path(state_dir) / f"node-{node:03d}.fault"


def _write(path: Path, record: dict) -> None:
    """Replace `path` whole (temp name + rename): a reader never sees half a record. No fsync: a
    heartbeat is about liveness, not durability."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def beat(step: int, phase: str = "step", **extra) -> None:
    """This rank's heartbeat (a no-op outside a node script)."""
    state_dir, rank = os.environ.get("STATE_DIR"), os.environ.get("RANK")
    if not state_dir or rank is None or not Path(state_dir).is_dir():
        return
    _heart.update(step=step)
    record = {"rank": int(rank), "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
              "node": int(os.environ.get("NODE_RANK", 0)), "host": socket.gethostname(), "pid": os.getpid(),
              "step": step, "phase": phase, "time": time.time(), **extra}
    _write(heartbeat_path(Path(state_dir), int(rank)), record)


def last_step() -> int:
    return _heart.get("step", 0)


class noting_failures:
    """`with noting_failures(): train()`: an exception leaving training is written to this rank's
    heartbeat (a started rank only), so the node's crash is named by rank and message."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb) -> None:
        from clusterctl.errors import UserError

        if exc is not None and "step" in _heart and not isinstance(exc, (UserError, KeyboardInterrupt)):
            beat(_heart["step"], FAILED, error=f"{kind.__name__}: {exc}"[:500])


# ---- node side --------------------------------------------------------------------------------

def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process (R, S, D, T stopped, Z), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def read_beats(state_dir: Path, ranks: range) -> dict[int, dict]:
    found = {}
    for rank in ranks:
        try:
            found[rank] = json.loads(heartbeat_path(state_dir, rank).read_text())
        except (OSError, ValueError):
            pass
    return found


def find_hang(beats: dict[int, dict], now: float, hang_timeout_s: float, state_of=process_state) -> dict | None:
    """The rank that stopped making steps, as a fault record, or None. A stopped process (state T,
    e.g. SIGSTOP) or one in uninterruptible sleep (D) is named before ranks merely waiting on it."""
    stalled = [(rank, record) for rank, record in beats.items()
               if record.get("phase") not in (DONE, FAILED) and now - record["time"] > hang_timeout_s]
    if not stalled:
        return None
    states = {rank: state_of(record["pid"]) for rank, record in stalled}
    rank, record = min(stalled, key=lambda item: (states[item[0]] not in ("T", "t", "D"), item[1]["time"]))
    state = {"T": "stopped (SIGSTOP)", "t": "stopped by a tracer", "D": "in uninterruptible sleep (I/O)"}.get(
        states[rank] or "", "still running" if states[rank] else "gone")
    cause = (f"hang: rank {rank} made no step for {now - record['time']:.0f} s after step {record['step']} "
             f"(hang_timeout_s {hang_timeout_s:g}; the process is {state})")
    return fault_record(record, "hang", cause, now, certain=states[rank] in ("T", "t", "D"))


def explain_crash(beats: dict[int, dict], launcher_rc: int, now: float,
                  gone: dict[int, float] | None = None) -> dict | None:
    """Why the node's launcher exited with launcher_rc, as a fault record; None when no rank had
    started stepping (a failure while starting is not restarted) or every rank finished. `gone`: when
    the watchdog first saw each rank's process vanish; the launcher stops a dead rank's siblings (SIGTERM,
    as silent as the death itself) only after it noticed the death, so the first to vanish is the cause."""
    if not beats:
        return None
    gone = gone or {}
    silent = sorted((r for r, b in beats.items() if b.get("phase") not in (DONE, FAILED)),
                    key=lambda r: (gone.get(r, float("inf")), r))
    failed = [r for r, b in beats.items() if b.get("phase") == FAILED]
    certain = bool(silent)
    if silent:
        record = beats[silent[0]]
        same = [r for r in silent[1:] if silent[0] in gone and abs(gone.get(r, -1e9) - gone[silent[0]]) < PID_POLL_S]
        cause = (f"crash: rank {record['rank']} (pid {record['pid']}) died without an error after step "
                 f"{record['step']} (killed by a signal: SIGKILL, a segfault or the OOM killer); "
                 f"launcher exit {launcher_rc}" + (f"; ranks {same} vanished at the same moment" if same else ""))
    elif failed:
        record = beats[min(failed)]
        cause = f"crash: rank {record['rank']} failed after step {record['step']}: {record.get('error', '?')}"
    else:
        return None
    return fault_record(record, "crash", cause, now, certain=certain)


def fault_record(beat_record: dict, kind: str, cause: str, now: float, *, certain: bool) -> dict:
    """node-NNN.fault; `certain`: this rank is itself broken (not merely waiting on or failing after another)."""
    return {"node": beat_record.get("node", 0), "host": beat_record.get("host", socket.gethostname()),
            "rank": beat_record["rank"], "step": beat_record["step"], "kind": kind, "cause": cause,
            "certain": certain, "time": now,
            **({"slurm_node": os.environ["SLURMD_NODENAME"]} if os.environ.get("SLURMD_NODENAME") else {})}


def record_fault(state_dir: Path, node: int, fault: dict) -> bool:
    """Write the node's fault file unless one is there (the first cause stays); True if written."""
    path = fault_path(state_dir, node)
    if path.exists():
        return False
    _write(path, fault)
    print(f"[clusterctl] fault on node {node} ({fault['host']}): {fault['cause']}", file=sys.stderr, flush=True)
    return True


def stop_ranks(launcher, beats: dict[int, dict]) -> None:
    """SIGKILL the ranks that are provably ours (children of the launcher we started, still the same
    process), then the launcher itself if it does not end by itself."""
    if not launcher.running():
        return
    for record in beats.values():
        pid = record["pid"]
        if parent_of(pid) == launcher.pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + LAUNCHER_GRACE_S
    while launcher.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    if launcher.running():
        os.kill(launcher.pid, signal.SIGKILL)


def node_ranks(node: int, per_node: int) -> range:
    return range(node * per_node, (node + 1) * per_node)


def watch(state_dir: Path, node: int, per_node: int, launcher, hang_timeout_s: float, poll_s: float = POLL_S) -> None:
    """Until the launcher ends: a hang is recorded and the node's ranks are stopped; the moment each
    rank's process vanishes is noted in node-NNN.gone (for --explain)."""
    ranks = node_ranks(node, per_node)
    gone: dict[int, float] = {}
    beats: dict[int, dict] = {}
    next_read = 0.0
    while launcher.running():
        if time.monotonic() >= next_read:   # heartbeats may sit on a shared file system: read them less often
            beats, next_read = read_beats(state_dir, ranks), time.monotonic() + poll_s
            fault = find_hang(beats, time.time(), hang_timeout_s)
            if fault:
                record_fault(state_dir, node, fault)
                stop_ranks(launcher, beats)
                return
        vanished = {r: time.time() for r, b in beats.items()
                    if r not in gone and b.get("phase") not in (DONE, FAILED) and process_state(b["pid"]) in (None, "Z")}
        if vanished:
            gone.update(vanished)
            _write(gone_path(state_dir, node), {str(r): at for r, at in gone.items()})
        time.sleep(min(PID_POLL_S, poll_s))


def gone_path(state_dir: Path, node: int) -> Path:
    return Path(state_dir) / f"node-{node:03d}.gone"


def read_gone(state_dir: Path, node: int) -> dict[int, float]:
    try:
        return {int(r): float(at) for r, at in json.loads(gone_path(state_dir, node).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def hang_timeout_of(config: str) -> float:
    """hang_timeout_s from the stage's config file (train.json), or the default."""
    try:
        return float(json.loads(Path(config).read_text()).get("hang_timeout_s", DEFAULT_HANG_TIMEOUT_S))
    except (OSError, ValueError, TypeError):
        return DEFAULT_HANG_TIMEOUT_S


def clear(state_dir: Path, node: int, per_node: int) -> None:
    """An earlier attempt's heartbeats and fault of this node must not be read as this one's."""
    for rank in node_ranks(node, per_node):
        heartbeat_path(state_dir, rank).unlink(missing_ok=True)
    fault_path(state_dir, node).unlink(missing_ok=True)
    gone_path(state_dir, node).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    from clusterctl.procs import Identity

    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="", help="the stage's train.json (for hang_timeout_s)")
    parser.add_argument("--launcher", type=int, help="watch this launcher's ranks (pid of a child of ours)")
    parser.add_argument("--explain", type=int, metavar="RC", help="name the crash after the launcher exited with RC")
    parser.add_argument("--clear", action="store_true", help="forget an earlier attempt's heartbeats and fault")
    args = parser.parse_args(argv)
    state_dir, node = Path(os.environ["STATE_DIR"]), int(os.environ["NODE_RANK"])
    per_node = int(os.environ.get("NPROC_PER_NODE", 1))
    if args.clear:
        clear(state_dir, node, per_node)
    elif args.explain is not None:
        if not fault_path(state_dir, node).exists():
            fault = explain_crash(read_beats(state_dir, node_ranks(node, per_node)), args.explain, time.time(),
                                  read_gone(state_dir, node))
            if fault:
                record_fault(state_dir, node, fault)
        try:
            certain = json.loads(fault_path(state_dir, node).read_text()).get("certain", True)
        except (OSError, ValueError):
            certain = True
        return 0 if certain else UNCERTAIN_EXIT
    elif args.launcher:
        launcher = Identity.of(args.launcher)
        if launcher is not None:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            watch(state_dir, node, per_node, launcher, hang_timeout_of(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
