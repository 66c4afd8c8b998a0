"""Completeness markers and checkpoint folders (CONTRACTS.md "Completeness markers").

A folder counts only once `clusterctl-complete.json` exists in it, written last after every other file
was fsynced; `<output_dir>/latest` names the newest complete tag and is replaced atomically after the
marker. Readers (resume, convert) ignore folders without the marker. No torch here.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from clusterctl.atomic import atomic_write_text, fsync_dir

MARKER = "clusterctl-complete.json"
TAG_PREFIX = "step-"


def write_marker(folder: Path, info: dict) -> None:
    atomic_write_text(Path(folder) / MARKER, json.dumps({**info, "time": time.time()}, indent=2) + "\n")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def step_of(tag: str) -> int | None:
    rest = tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def complete_tags(output_dir: Path) -> list[str]:
    """Complete checkpoint tags under output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    tags = [p.name for p in output_dir.iterdir()
            if p.is_dir() and step_of(p.name) is not None and is_complete(p)]
    return sorted(tags, key=step_of)


def latest_complete(output_dir: Path) -> str | None:
    tags = complete_tags(output_dir)
    return tags[-1] if tags else None


def publish(output_dir: Path, tag: str, info: dict) -> None:
    """Mark output_dir/tag complete, then point `latest` at it (only after all ranks finished writing)."""
    folder = Path(output_dir) / tag
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)
    write_marker(folder, {"tag": tag, **info})
    atomic_write_text(Path(output_dir) / "latest", tag)


def prune(output_dir: Path, keep: int) -> list[str]:
    """Remove complete checkpoints beyond the newest `keep` (marker first, so a half-removed folder never
    looks complete) and incomplete tag folders older than the newest complete one."""
    output_dir = Path(output_dir)
    tags = complete_tags(output_dir)
    removed = tags[:-keep] if keep > 0 else []
    newest = step_of(tags[-1]) if tags else -1
    stale = [p.name for p in output_dir.iterdir()
             if p.is_dir() and step_of(p.name) is not None and not is_complete(p) and step_of(p.name) < newest]
    for tag in removed + stale:
        (output_dir / tag / MARKER).unlink(missing_ok=True)
        shutil.rmtree(output_dir / tag, ignore_errors=True)
    return removed + stale


def write_hf_metadata(base_model: Path, output_dir: Path) -> Path:
    """`<output_dir>/hf/`: the base model's config, generation config, tokenizer and code files (everything
    but weights), which convert needs for the architecture. Replaced as a whole (tmp dir + rename)."""
    base_model, target = Path(base_model), Path(output_dir) / "hf"
    weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
    tmp = target.with_name(".hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(base_model.iterdir()):
        if path.is_file() and path.name != MARKER and not path.name.endswith(weights):
            shutil.copy2(path, tmp / path.name)
            with open(tmp / path.name, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target
