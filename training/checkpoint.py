"""Checkpoint folders of the SFT stage: `<output_dir>/step-N/`, published with the completeness marker.

The rules (marker last, the newest complete tag by step) live in clusterctl.atomic, shared with the
converter; here: naming our tags, publishing one, pruning old ones, and the `hf/` metadata folder.
`<output_dir>/latest` names the newest complete tag and is replaced atomically after the marker (under
`select: best`, the best one). No torch here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from clusterctl.atomic import (
    MARKER,
    atomic_write_text,
    complete_tags,
    fsync_dir,
    fsync_tree,
    is_complete,
    latest_complete,
    step_of,
    write_marker,
)

__all__ = ["MARKER", "TAG_PREFIX", "complete_tags", "is_complete", "latest_complete", "prune", "publish",
           "step_of", "tag_for", "write_hf_metadata", "write_marker"]
TAG_PREFIX = "step-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def publish(output_dir: Path, tag: str, info: dict) -> None:
    """Mark output_dir/tag complete, then point `latest` at it (only after all ranks finished writing)."""
    folder = Path(output_dir) / tag
    fsync_tree(folder)
    write_marker(folder, {"tag": tag, **info})
    atomic_write_text(Path(output_dir) / "latest", tag)


def prune(output_dir: Path, keep: int, protect: str | None = None) -> list[str]:
    """Remove complete checkpoints beyond the newest `keep` (marker first, so a half-removed folder never
    looks complete) and incomplete tag folders older than the newest complete one; `protect` (the best
    checkpoint under `select: best`) stays."""
    output_dir = Path(output_dir)
    tags = complete_tags(output_dir)
    removed = [tag for tag in (tags[:-keep] if keep > 0 else []) if tag != protect]
    newest = step_of(tags[-1]) or 0 if tags else -1
    stale = [p.name for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
             and (step := step_of(p.name)) is not None and step < newest and not is_complete(p)]
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
    fsync_tree(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target
