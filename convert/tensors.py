"""One output tensor read out of a ZeRO checkpoint: the fast path the converter writes, and the obvious
path verification compares it with (kept apart from both so neither imports the other)."""
from __future__ import annotations

from .checkpoint import ZeroCheckpoint
from .layout import Piece


def extract(ck: ZeroCheckpoint, p: Piece):
    """One output tensor, cast as it is gathered: each rank's slice is copied once, straight from the mapped
    file into the output buffer (a piece that is not one contiguous run of its source takes the simple path)."""
    import torch

    if not p.contiguous:
        return reference_extract(ck, p)
    out = torch.empty(p.numel, dtype=getattr(torch, p.dtype))
    at = 0
    for segment in ck.segments(p.source, p.offset, p.numel):
        out[at:at + segment.numel()].copy_(segment)
        at += segment.numel()
    return out.view(p.shape)


def reference_extract(ck: ZeroCheckpoint, p: Piece):
    """The same tensor by the obvious route (gather, take the view, cast): what verification compares with."""
    import torch

    return ck.read(p.source, p.offset, p.span).as_strided(p.shape, p.stride).to(getattr(torch, p.dtype))

