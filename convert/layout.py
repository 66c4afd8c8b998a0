"""Which output tensor comes from which slice of which checkpoint tensor, in the model's standard names.

A DeepSpeed checkpoint holds transformers' in-memory names (transformers 5 fuses MoE experts into
`mlp.experts.gate_up_proj [E, 2I, H]`).  The servable layout is what `save_pretrained` writes: one tensor
per expert.  Rather than hard-coding that mapping per architecture, transformers' own reverse conversion is
run on meta tensors whose `contiguous()` is a no-op, so every output comes back as a strided view of its
source: its storage offset and strides say exactly which elements to read.  Outputs that are not views of a
single source (a conversion that copies or merges) are refused rather than guessed.

That map depends only on config.json and the transformers release, and computing it costs more than
converting a small model (importing transformers, building the model on meta), so the SFT stage saves it
beside config.json and a conversion reads it back when both still match.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Set
from dataclasses import dataclass

from clusterctl.errors import UserError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Piece:
    """One output tensor: `shape` read from `source` with `stride` starting at element `offset`."""

    name: str
    source: str
    offset: int
    shape: tuple
    stride: tuple
    dtype: str          # torch dtype name of the output, e.g. "bfloat16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def span(self) -> int:
        """How many source elements, from `offset`, the piece touches."""
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) if self.numel else 0

    @property
    def contiguous(self) -> bool:
        """Whether the piece is one run of `numel` source elements in row-major order."""
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    @property
    def nbytes(self) -> int:
        import torch

        return self.numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


LAYOUT_FILE = "clusterctl-layout.json"


def _config_key(hf_dir: str) -> dict:
    """What the architecture map depends on: the exact config.json and the transformers release (and the
    file's own format)."""
    from importlib.metadata import version

    with open(os.path.join(hf_dir, "config.json"), "rb") as f:
        return {"format": 1, "config_sha256": hashlib.sha256(f.read()).hexdigest(),
                "transformers": version("transformers")}


def meta_model(hf_dir: str):
    """The architecture from config.json, on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the model config ({exc})", where=hf_dir,
                        fix="the SFT stage copies config.json and tokenizer files to <output_dir>/hf") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def architecture_map(model) -> dict:
    """What `plan` needs from transformers, as plain data: the tensors the model expects (tied copies left
    out), each one's output views, and the modules kept in fp32.  Computed on meta tensors."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    wanted = remove_tied_weights_from_state_dict(model.state_dict(), model)

    class Probe(torch.Tensor):
        def contiguous(self, *args, **kwargs):  # keep views as views so offsets survive the conversion
            return self

    views: dict[str, list] = {}
    for source, tensor in wanted.items():
        probe = torch.empty(tensor.shape, device="meta").as_subclass(Probe)
        views[source] = []
        for name, view in revert_weight_conversion(model, {source: probe}).items():
            if view.untyped_storage()._cdata != probe.untyped_storage()._cdata:
                raise UserError(f"the conversion of {source} -> {name} for {type(model).__name__} copies or "
                                "merges tensors, which the streaming converter does not support",
                                fix="report the architecture; DeepSpeed's zero_to_fp32 + save_pretrained works")
            views[source].append([name, view.storage_offset(), list(view.shape), list(view.stride())])
    return {"shapes": {name: list(t.shape) for name, t in wanted.items()}, "views": views,
            "keep_fp32_strict": list(getattr(model, "_keep_in_fp32_modules_strict", None) or []),
            "keep_fp32": list(getattr(model, "_keep_in_fp32_modules", None) or [])}


def write_layout(hf_dir: str) -> None:
    """Save the architecture map beside config.json (the SFT stage does, with transformers already loaded),
    so a conversion reads it instead of importing transformers and building the model."""
    from .staging import write_json

    write_json(os.path.join(hf_dir, LAYOUT_FILE), {**_config_key(hf_dir), **architecture_map(meta_model(hf_dir))})


def load_layout(hf_dir: str, log=None) -> dict:
    """The saved architecture map when it was made from this exact config by this transformers release;
    otherwise computed now (a few seconds: transformers is imported and the model built on meta)."""
    path = os.path.join(hf_dir, LAYOUT_FILE)
    key = _config_key(hf_dir)
    try:
        with open(path) as f:
            saved = json.load(f)
        if all(saved.get(k) == v for k, v in key.items()):
            return saved
    except (OSError, ValueError):
        pass
    if log:
        log(f"no {LAYOUT_FILE} made from this config.json: building the model on meta to map names")
    return architecture_map(meta_model(hf_dir))


def _fp32_patterns(layout: dict, dtype: str) -> list[str]:
    """Modules transformers keeps in fp32 when loading in `dtype` (the non-strict list only for fp16)."""
    if dtype == "fp32":
        return []
    return layout["keep_fp32_strict"] + (layout["keep_fp32"] if dtype == "fp16" else [])


GROUPED = re.compile(r"^(?P<experts>.*\.experts)\.groups\.(?P<group>\d+)\.(?P<param>[^.]+)$")


def with_groups(layout: dict, names: Iterable[str]) -> dict:
    """The map for a checkpoint trained with routed experts in groups (training/experts.py): fused
    `X.experts.P [E, ...]` becomes `X.experts.groups.<g>.P [E/G, ...]` for the G groups that `names` (the
    checkpoint's or an adapter's tensor names) hold, each output view moved to its group's tensor at the
    same place within its expert.  Without grouped names the map is returned as it is."""
    found: dict[str, set[int]] = {}
    for name in names:
        match = GROUPED.match(name)
        if match and name not in layout["shapes"]:
            found.setdefault(f"{match['experts']}.{match['param']}", set()).add(int(match["group"]))
    if not found:
        return layout
    shapes, views = dict(layout["shapes"]), dict(layout["views"])
    for fused, present in found.items():
        if fused not in shapes:
            continue                                  # _check_names names what is not in the model
        groups, (experts, *inner) = max(present) + 1, shapes.pop(fused)
        if experts % groups:
            raise UserError(f"{groups} expert groups do not divide the {experts} experts of {fused}",
                            fix="the checkpoint was not trained from this config.json")
        block = experts // groups * math.prod(inner)
        outputs = views.pop(fused)
        prefix, _, param = fused.rpartition(".")
        for g in range(groups):
            source = f"{prefix}.groups.{g}.{param}"
            shapes[source] = [experts // groups, *inner]
            views[source] = [[out, offset - g * block, shape, stride] for out, offset, shape, stride in outputs
                             if g * block <= offset < (g + 1) * block]
            for out, offset, shape, stride in views[source]:
                piece = Piece(out, source, offset, tuple(shape), tuple(stride), "float32")
                if offset + piece.span > block:
                    raise UserError(f"{out} spans two expert groups of {fused}",
                                    fix="report the architecture; its experts are not stored one after another")
    return {**layout, "shapes": shapes, "views": views}


def plan(layout: dict, shapes: dict[str, tuple], stored_dtypes: dict[str, str], dtype: str,
         aliases: Set[str] = frozenset()) -> list[Piece]:
    """Output pieces in checkpoint order.  `shapes`/`stored_dtypes`: the checkpoint's tensors by name;
    `aliases`: names the checkpoint shares with another (tied weights), written once."""
    layout = with_groups(layout, shapes)
    _check_names(layout["shapes"], shapes, set(aliases))
    keep_fp32 = _fp32_patterns(layout, dtype)
    pieces = [Piece(name, source, offset, tuple(shape), tuple(stride),
                    _out_dtype(name, source, stored_dtypes[source], dtype, keep_fp32))
              for source in shapes if source in layout["views"]
              for name, offset, shape, stride in layout["views"][source]]
    _check_unique(pieces)
    return pieces


def _out_dtype(name: str, source: str, stored: str, dtype: str, keep_fp32: list[str]) -> str:
    if stored not in ("float32", "bfloat16", "float16"):
        return stored                     # integer buffers stay as they are
    if any(p in name or p in source for p in keep_fp32):
        return "float32"
    return DTYPES[dtype]


def _check_names(wanted: dict[str, list], shapes: dict[str, tuple], aliases: set[str]) -> None:
    def listed(names):
        return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")

    missing = sorted(n for n in wanted if n not in shapes)
    unexpected = sorted(n for n in shapes if n not in wanted and n not in aliases)
    wrong = sorted(f"{n} {tuple(shapes[n])} != {tuple(wanted[n])}" for n in wanted
                   if n in shapes and tuple(shapes[n]) != tuple(wanted[n]))
    problems = [f"{what}: {listed(names)}" for what, names in
                (("missing from the checkpoint", missing), ("not in the model", unexpected),
                 ("shape mismatch", wrong)) if names]
    if problems:
        raise UserError("checkpoint does not match the architecture in config.json: " + "; ".join(problems),
                        fix="<output_dir>/hf/config.json must be the config of the model that was trained")


def _check_unique(pieces: list[Piece]) -> None:
    seen = set()
    for p in pieces:
        if p.name in seen:
            raise UserError(f"two checkpoint tensors map to the output name {p.name}",
                            fix="report the architecture; its weight conversion is ambiguous")
        seen.add(p.name)
