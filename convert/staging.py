"""The output folder's life cycle: build beside it, resume what finished, swap in whole with its marker last.

Everything is written into `<out>.partial/`; finished shards are recorded (size + sha256) so a re-run after
an interruption keeps them once re-hashed, and the folder becomes `<out>` by one rename after the marker
is written.  A complete `<out>` is replaced only with --force.  The checkpoint converter and the FP8 cast
both write their Hugging Face folders through it: shards, index, config, side files, marker.
"""
from __future__ import annotations

import json
import os
import shutil

from clusterctl.atomic import MARKER, atomic_write_bytes, fsync_dir, is_complete
from clusterctl.errors import UserError

from .sfio import file_record

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_BOOK = ".clusterctl-partial"     # bookkeeping inside the staging folder; removed before the swap
_SMALL_FILES = 64 << 20           # room kept for config, tokenizer and index beside the shards


def write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class Staging:
    """`<out>.partial/`, checked against `out` and prepared for a fingerprint of the planned output."""

    def __init__(self, out: str, force: bool):
        self.out = os.path.abspath(out)
        self.dir = self.out + ".partial"
        self.book = os.path.join(self.dir, _BOOK)
        self.force = force
        if os.path.exists(self.out) and not force:
            if is_complete(self.out):
                raise UserError("output is already a complete model folder", where=self.out,
                                fix="pass --force to overwrite it, or choose another --out")
            if os.listdir(self.out):
                raise UserError(f"output folder exists, is not empty and has no {MARKER}", where=self.out,
                                fix="remove it or pass --force (it will be replaced)")

    def prepare(self, fingerprint: dict) -> bool:
        """Make the staging folder ready; True when it resumes an earlier run of the same conversion."""
        plan = os.path.join(self.book, "plan.json")
        if os.path.exists(plan):
            with open(plan) as f:
                if json.load(f) == fingerprint:
                    return True
        if os.path.exists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(os.path.join(self.book, "shards"))
        write_json(plan, fingerprint)
        return False

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _record_path(self, shard: str) -> str:
        return os.path.join(self.book, "shards", shard + ".json")

    def finished(self, shard: str) -> dict | None:
        """The record of a shard written by an earlier run, if the file still matches it byte for byte."""
        rec_path, path = self._record_path(shard), self.path(shard)
        if not (os.path.exists(rec_path) and os.path.exists(path)):
            return None
        with open(rec_path) as f:
            rec = json.load(f)
        if os.path.getsize(path) == rec["size"] and file_record(path) == rec:
            return rec
        os.unlink(rec_path)
        return None

    def record(self, shard: str, rec: dict) -> None:
        write_json(self._record_path(shard), rec)

    def require_space(self, shard_bytes: int, *, discard: bool) -> None:
        """Refuse before writing when the file system lacks room for `shard_bytes` and the small files
        (`discard`: remove the staging folder then, when it holds nothing worth resuming)."""
        need, free = shard_bytes + _SMALL_FILES, shutil.disk_usage(self.dir).free
        if need > free:
            if discard:
                self.discard()
            raise UserError(f"not enough disk space: the output needs {need / 2**30:.2f} GiB, "
                            f"{free / 2**30:.2f} GiB free", where=self.dir,
                            fix="free space or choose another output folder")

    def write_index(self, weight_map: dict[str, str], total_size: int) -> None:
        write_json(self.path(INDEX), {"metadata": {"total_size": total_size}, "weight_map": weight_map})

    def copy_side_files(self, src_dir: str, skip: tuple[str, ...] = ()) -> list[str]:
        """generation_config, tokenizer and code files of `src_dir`: every plain file but config.json (the
        caller writes its own), weights and `skip`. Returns the names copied."""
        copied = []
        for name in sorted(os.listdir(src_dir)):
            src = os.path.join(src_dir, name)
            if name == "config.json" or name in skip or name.endswith(WEIGHT_SUFFIXES) or not os.path.isfile(src):
                continue
            with open(src, "rb") as f:
                atomic_write_bytes(self.path(name), f.read())
            copied.append(name)
        return copied

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def finalize(self, marker: dict) -> None:
        """Marker last, then one rename makes `<out>` appear complete (an old complete one is replaced)."""
        shutil.rmtree(self.book)
        write_json(self.path(MARKER), marker)          # also makes the folder's names durable
        old = None
        if os.path.exists(self.out):
            old = f"{self.out}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        fsync_dir(os.path.dirname(self.out))
        if old:
            shutil.rmtree(old)
