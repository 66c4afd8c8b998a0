"""Read a DeepSpeed ZeRO-2/3 checkpoint lazily: one parameter (or one slice of one) at a time.

The rank files are memory-mapped, so reading a slice touches only its pages; nothing here gathers the
whole model.  Completeness is checked up front so a half-written checkpoint is refused with a message
naming what is missing instead of producing a quietly wrong model.
"""
from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass

from clusterctl.atomic import MARKER, latest_complete
from clusterctl.errors import UserError

_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")


class _Opaque:
    """Stand-in for a DeepSpeed object inside a checkpoint; its contents are not needed."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def load_lazy(path: str) -> dict:
    """torch.load memory-mapped and weights-only; a truncated or unreadable file becomes a UserError."""
    import torch

    try:
        # DeepSpeed pickles some of its own objects (enums, loss scaler, fragment addresses) that conversion
        # never uses: stand-ins keep weights_only=True (no code runs from a checkpoint) without deepspeed.
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        foreign = [g for g in found if not g.startswith("deepspeed.")]
        if foreign:
            raise UserError(f"checkpoint pickles objects outside DeepSpeed: {', '.join(foreign)}", where=path,
                            fix="only DeepSpeed ZeRO checkpoints are converted; loading this would run its code")
        with torch.serialization.safe_globals([(_Opaque, name) for name in found]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # zip/pickle errors have many types; all mean the same thing here
        raise UserError(f"cannot read checkpoint file ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                        where=path, fix="the file is truncated or corrupt: convert an older complete tag, "
                                        "or re-save this checkpoint") from None


def resolve(path: str) -> tuple[str, str]:
    """(tag folder, hf folder) for an SFT output_dir (newest complete tag) or for one tag folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError("checkpoint folder does not exist", where=path, fix="pass the SFT output_dir or a tag folder")
    if _rank_files(path):
        tag_dir = path
        if not os.path.exists(os.path.join(tag_dir, MARKER)):
            raise UserError(f"checkpoint tag is incomplete: {MARKER} is missing", where=tag_dir,
                            fix="the save was interrupted; pass the output_dir to pick the newest complete tag")
        return tag_dir, os.path.join(os.path.dirname(tag_dir), "hf")
    return _newest_complete_tag(path), os.path.join(path, "hf")


def _newest_complete_tag(out_dir: str) -> str:
    """The tag `latest` names when it is complete (under `select: best`, the best one), else the newest
    complete tag by step (the rule of clusterctl.atomic, the one training resumes by)."""
    latest = os.path.join(out_dir, "latest")
    if os.path.exists(latest):
        with open(latest, "rb") as f:
            tag = f.read(4096).decode("utf-8", errors="replace").strip()
        tag_dir = os.path.join(out_dir, tag)
        if not tag or os.sep in tag or tag in (".", "..") or not os.path.isdir(tag_dir):
            raise UserError(f"'latest' names tag {tag!r}, which does not exist as a folder of {out_dir}",
                            where=latest, fix="pass a tag folder explicitly, or fix the 'latest' file")
        if os.path.exists(os.path.join(tag_dir, MARKER)):
            return tag_dir
    newest = latest_complete(out_dir)
    if newest is None:
        raise UserError(f"no complete checkpoint tag (a sub-folder named by its step, holding {MARKER})",
                        where=out_dir, fix="wait for the SFT stage to save a checkpoint, or pass a tag folder")
    return os.path.join(out_dir, newest)


def _rank_files(tag_dir: str) -> dict[tuple[str, int, int], str]:
    found = {}
    for name in os.listdir(tag_dir):
        m = _RANK_FILE.search(name)
        if m:
            found[(m.group(3), int(m.group(1)), int(m.group(2)))] = os.path.join(tag_dir, name)
    return found


class FlatView:
    """Several 1-D tensors read as one concatenated vector, without concatenating them."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + p.numel())

    def __len__(self):
        return self.starts[-1]

    def read(self, start: int, count: int) -> list:
        """The pieces covering [start, start+count), as views into the mapped files."""
        pieces, end = [], start + count
        i = bisect.bisect_right(self.starts, start) - 1
        while start < end:
            lo = start - self.starts[i]
            take = min(end, self.starts[i + 1]) - start
            pieces.append(self.parts[i].view(-1).narrow(0, lo, take))
            start += take
            i += 1
        return pieces


@dataclass
class Param:
    """Where one full parameter lives: element i is in rank i // per_rank at offset + i % per_rank
    (ZeRO-3), or at offset + i in one flat group spread over the ranks (ZeRO-2: per_rank = 0)."""

    shape: tuple
    flats: list          # ZeRO-3: one FlatView per rank; ZeRO-2: a single FlatView
    offset: int
    per_rank: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ZeroCheckpoint:
    """The fp32 master weights and buffers of one checkpoint tag, readable slice by slice."""

    def __init__(self, tag_dir: str):
        self.tag_dir = tag_dir
        files = _rank_files(tag_dir)
        if any(mp != 0 for _, _, mp in files):
            raise UserError("tensor/pipeline-parallel checkpoints (mp_rank_01 and up) are not supported",
                            where=tag_dir, fix="train with tensor parallel size 1 (ZeRO only)")
        optim = {rank: path for (kind, rank, _), path in files.items() if kind == "optim"}
        if 0 not in optim:
            raise UserError("no optimizer state file for rank 0 (*zero_pp_rank_0_mp_rank_00_optim_states.pt)",
                            where=tag_dir, fix="this is not a DeepSpeed ZeRO checkpoint, or rank 0's save failed")
        first = load_lazy(optim[0])["optimizer_state_dict"]
        world = first["partition_count"]
        world = max(world) if isinstance(world, list) else world
        self.stage = 3 if "fp32_flat_groups" in first else 2
        self.world = world
        missing = [f"rank {r}: *zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world) if r not in optim]
        model_ranks = range(world) if self.stage == 3 else range(1)
        model = {r: files.get(("model", r, 0)) for r in model_ranks}
        if self.stage == 2 and model[0] is None:
            model[0] = next((os.path.join(tag_dir, n) for n in os.listdir(tag_dir)
                             if n.endswith("mp_rank_00_model_states.pt")), None)
        missing += [f"rank {r}: *zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r, p in model.items() if p is None]
        if missing:
            raise UserError(f"checkpoint of {world} ranks is missing files: " + "; ".join(missing), where=tag_dir,
                            fix="a rank's save did not finish: convert an older complete tag")
        found = {r: p for r, p in model.items() if p is not None}        # every rank, after the check above
        self.files = sorted(optim.values()) + sorted(found.values())
        opt = [first] + [load_lazy(optim[r])["optimizer_state_dict"] for r in range(1, world)]
        states = [load_lazy(found[r]) for r in model_ranks]
        self.params: dict[str, Param] = {}
        self._index(opt, states)
        module = states[0]["module"]
        self.buffers = {name: module[name] for name in states[0].get("buffer_names", []) if name in module}
        self.shared = dict(states[0].get("shared_params") or {})

    def _index(self, opt: list, states: list) -> None:
        shapes = states[0]["param_shapes"]
        if self.stage == 3:
            ranks = [FlatView(o["fp32_flat_groups"]) for o in opt]
            offset = 0
            for name, shape in ((n, s) for group in shapes for n, s in group.items()):
                per_rank = math.ceil(math.prod(shape) / self.world)
                self.params[name] = Param(tuple(shape), ranks, offset, per_rank)
                offset += per_rank
            if offset != len(ranks[0]):
                raise UserError(f"parameter shapes cover {offset} elements per rank, the optimizer files hold "
                                f"{len(ranks[0])}", where=self.tag_dir, fix="the checkpoint's files come from different saves")
            for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
                frags = FlatView(s["frozen_param_fragments"][name] for s in states)
                self.params[name] = Param(tuple(shape), [frags], 0, 0)
            return
        paddings = opt[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            flat = FlatView(o["single_partition_of_fp32_groups"][g] for o in opt)
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                self.params[name] = Param(tuple(shape), [flat], offset, 0)
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            if offset > len(flat):
                raise UserError(f"parameter group {g} needs {offset} elements, the optimizer files hold {len(flat)}",
                                where=self.tag_dir, fix="the checkpoint's files come from different saves")
        for name, frag in (states[0].get("frozen_param_fragments") or {}).items():
            self.params[name] = Param(tuple(frag.shape), [FlatView([frag])], 0, 0)

    def names(self) -> set[str]:
        return set(self.params) | set(self.buffers) | set(self.shared)

    def shape(self, name: str) -> tuple:
        name = self.shared.get(name, name)
        return tuple(self.buffers[name].shape) if name in self.buffers else self.params[name].shape

    def dtype(self, name: str) -> str:
        """The stored dtype's torch name (fp32 for master weights; buffers and frozen params as saved)."""
        name = self.shared.get(name, name)
        tensor = self.buffers[name] if name in self.buffers else self.params[name].flats[0].parts[0]
        return str(tensor.dtype).removeprefix("torch.")

    def segments(self, name: str, start: int = 0, count: int | None = None) -> list:
        """Elements [start, start+count) of the flattened tensor in its stored dtype, as consecutive read-only
        views of the mapped files (one per rank the range crosses): nothing is copied.  Callers must not
        write to them."""
        name = self.shared.get(name, name)
        if name in self.buffers:
            flat = self.buffers[name].reshape(-1)
            return [flat.narrow(0, start, flat.numel() - start if count is None else count)]
        p = self.params[name]
        count = p.numel - start if count is None else count
        if p.per_rank == 0:
            return p.flats[0].read(p.offset + start, count)
        pieces, end = [], start + count
        while start < end:
            rank, within = divmod(start, p.per_rank)
            take = min(end - start, p.per_rank - within)
            pieces += p.flats[rank].read(p.offset + within, take)
            start += take
        return pieces

    def read(self, name: str, start: int = 0, count: int | None = None):
        """The same elements as one tensor (the simple path: verification compares against it): the mapped
        view itself when one rank holds them all, else a new tensor.  Callers must not write to it."""
        import torch

        pieces = self.segments(name, start, count)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
