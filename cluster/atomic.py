"""The file-system guarantees every package shares, the node-side ones included: nothing half-written
looks complete (CONTRACTS.md "Completeness markers").

- Files: a temp name in the same folder, fsync, rename, fsync the folder; a reader sees the old file
  or the new one, never half of one.
- Folders: complete only once the marker `clusterctl-complete.json` exists in it, written last, after
  every other file was fsynced. Readers ignore folders without it.
- Checkpoints: a tag folder's step is the number its name ends with (step-N, global_stepN); the newest
  complete checkpoint is the complete tag with the highest step. Not the newest mtime: a copied folder
  or a touched marker would change that answer.

Stdlib only: the orchestrator, the trainer, the converter and the deploy helpers all import it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

MARKER = "clusterctl-complete.json"
_STEP = re.compile(r"(\d+)$")


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def fsync_dir(path: str | Path) -> None:
    """Make the names in a folder (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Every file under `folder`, then the folder itself: what must be on disk before its marker."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def write_marker(folder: str | Path, info: dict) -> None:
    """Declare `folder` complete; call it last, once everything in it is durable."""
    atomic_write_text(Path(folder) / MARKER, json.dumps({**info, "time": time.time()}, indent=2) + "\n")


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def step_of(tag: str) -> int | None:
    """The step a checkpoint tag names: the number it ends with (step-12, global_step12), else None."""
    found = _STEP.search(tag)
    return int(found.group(1)) if found else None


def complete_tags(output_dir: str | Path) -> list[str]:
    """The complete checkpoint tags (sub-folders with a step and the marker) of output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    tags = [p.name for p in output_dir.iterdir() if p.is_dir() and step_of(p.name) is not None and is_complete(p)]
    return sorted(tags, key=lambda tag: (step_of(tag), tag))


def latest_complete(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint tag by step (what training resumes from), or None."""
    tags = complete_tags(output_dir)
    return tags[-1] if tags else None
