"""Finding processes on this machine: is one alive, and which ones belong to a run (by environment)."""
from __future__ import annotations

import os
from pathlib import Path


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


def processes_with_env(*marks: str, pgid: int | None = None) -> list[int]:
    """Live processes whose environment holds every `NAME=value` of `marks` (children inherit it even
    when they leave the process group), plus the members of process group `pgid` when given."""
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
