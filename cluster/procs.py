"""Finding processes on this machine: is one alive, is it the one we started, and which ones
belong to a run (by environment).

A pid alone names a process only until it exits: after a crash or a reboot the number is reused,
and a copied run folder names processes on another host. So what we start is recorded as an
Identity (host, boot id, start time in clock ticks since boot, from /proc/PID/stat) and nothing is
signalled unless the live process still matches it."""
from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def boot_id() -> str:
    return BOOT_ID.read_text().strip()


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Identity:
    """Enough to tell the process we started from a later one that got the same pid."""
    pid: int
    host: str
    boot_id: str
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> Identity | None:
        ticks = start_ticks(pid)
        return None if ticks is None else cls(pid, socket.gethostname(), boot_id(), ticks)

    @classmethod
    def from_record(cls, record: object) -> Identity | None:
        """From run.json's dict form; None for a record that lacks a field (written by an older clusterctl)."""
        try:
            return cls(int(record["pid"]), str(record["host"]), str(record["boot_id"]),  # type: ignore[index]
                       int(record["start_ticks"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def from_pid_file(cls, text: str) -> Identity | None:
        """A node script's pid marker: "PGID HOSTNAME BOOT_ID START_TICKS" (of the group leader)."""
        fields = text.split()
        try:
            return cls(int(fields[0]), fields[1], fields[2], int(fields[3]))
        except (IndexError, ValueError):
            return None

    def to_record(self) -> dict:
        return asdict(self)

    def running(self) -> bool:
        """True while the process we recorded still runs (on this host, since this boot)."""
        return (self.host == socket.gethostname() and self.boot_id == boot_id() and alive(self.pid)
                and start_ticks(self.pid) == self.start_ticks)

    def gone(self) -> bool:
        """True when this host can tell the process has ended (exited, pid reused, or rebooted since)."""
        return self.host == socket.gethostname() and not self.running()

    def refusal(self, what: str) -> str:
        """Why the process at this pid must not be signalled as `what` ("" when it is ours or nothing is there)."""
        if self.host != socket.gethostname():
            return f"{what} (pid {self.pid}) runs on {self.host}, not here ({socket.gethostname()}): not signalled"
        if self.running() or self.boot_id != boot_id() or not alive(self.pid):
            return ""
        return (f"pid {self.pid} is no longer {what} (another process started at tick {start_ticks(self.pid)}, "
                f"not {self.start_ticks}): not signalled")


def processes_with_env(*marks: str, pgid: int | None = None) -> list[int]:
    """Live processes whose environment holds every `NAME=value` of `marks` (children inherit it even
    when they leave the process group), plus the members of process group `pgid` when given (pass it
    only for a group whose leader was verified to be ours)."""
    wanted = [mark.encode() for mark in marks]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            if pgid is not None and os.getpgid(pid) == pgid:
                found.append(pid)
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if all(mark in environ for mark in wanted):
            found.append(pid)
    return [pid for pid in found if alive(pid)]


def stop_processes(find: Callable[[], list[int]], grace: float) -> int:
    """TERM the processes `find()` names, KILL those that outlive `grace` seconds; how many were found."""
    first = pids = find()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            time.sleep(0.1)
            pids = find()
        if not pids:
            break
    return len(first)
