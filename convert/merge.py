"""Base model folder + LoRA adapter -> the merged, standard per-expert Hugging Face folder, one tensor at a time.

Each output tensor is the base folder's tensor plus its LoRA delta (`scaling * B @ A`, in fp32, cast back to
the base tensor's dtype). Fused routed experts (transformers 5's `mlp.experts.gate_up_proj [E, 2I, H]`, trained
by peft's per-expert `lora_A [E*r, in]`, `lora_B [out, E*r]`) are merged expert by expert: the converter's name
map (convert/layout.py) says which slice of the fused tensor each per-expert output is, so only one expert's
delta is ever in memory. Same guarantees as the checkpoint converter (convert/staging.py): staged in
`<out>.partial`, finished shards kept on resume, marker last; verified by structure, by recomputing every
tensor, and by logits against base + adapter through peft.

The adapter folder is what the SFT stage saves per checkpoint (`<tag>/adapter/`: peft's files plus
`clusterctl-lora.json`, training/lora.py:merge_map).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

from clusterctl.atomic import MARKER
from clusterctl.errors import UserError
from clusterctl.training.lora import MERGE_MAP

from .core import log, shards_of
from .layout import GROUPED, Piece, load_layout, with_groups
from .sfio import ShardWriter, read_header
from .staging import INDEX, Staging, write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass(frozen=True)
class Delta:
    """The LoRA delta of one output tensor: a strided view (offset, stride) of one adapted weight, or of one
    expert's block of a fused weight."""

    target: str          # the adapted weight's in-memory name
    offset: int          # element offset of the output within that weight
    shape: tuple
    stride: tuple
    block: int           # elements per expert of a fused weight; 0 for a plain one


class Adapter:
    """The adapter's factors, read lazily (mapped file), and its merge map."""

    def __init__(self, folder: str):
        self.folder = folder
        weights, merge_map = os.path.join(folder, ADAPTER_WEIGHTS), os.path.join(folder, MERGE_MAP)
        for path in (weights, merge_map, os.path.join(folder, "adapter_config.json")):
            if not os.path.isfile(path):
                raise UserError(f"not a clusterctl LoRA adapter folder: {os.path.basename(path)} is missing",
                                where=folder, fix="give a LoRA checkpoint tag's adapter/ folder (sft.method: lora)")
        from safetensors import safe_open

        self.file = safe_open(weights, framework="pt")
        with open(merge_map) as f:
            self.targets = json.load(f)["targets"]
        with open(os.path.join(folder, "adapter_config.json")) as f:
            self.config = json.load(f)

    def factors(self, target: str):
        import torch

        key = self.targets[target]["key"]
        return (self.file.get_tensor(f"{key}.lora_A.weight").to(torch.float32),
                self.file.get_tensor(f"{key}.lora_B.weight").to(torch.float32))

    def block(self, target: str, expert: int):
        """scaling * B @ A for a plain weight, or for one expert of a fused weight (in the weight's layout)."""
        info = self.targets[target]
        a, b = self.factors(target)
        experts = info["experts"]
        if experts:
            a = a.reshape(experts, -1, a.shape[-1])[expert]            # peft: A rows grouped by expert
            b = b.reshape(b.shape[0], -1, experts)[:, :, expert]       # peft: B columns interleaved
        delta = (b @ a) * info["scaling"]
        return delta.T.contiguous() if info.get("layout") == "e i o" else delta

    def delta(self, d: Delta):
        import torch

        expert, offset = divmod(d.offset, d.block) if d.block else (0, d.offset)
        return torch.as_strided(self.block(d.target, expert).reshape(-1), d.shape, d.stride, offset)


def lora_checkpoint(checkpoint: str) -> tuple[str, str, str] | None:
    """(tag folder, hf folder, adapter folder) when `checkpoint` resolves to a LoRA/QLoRA SFT checkpoint."""
    from .checkpoint import resolve

    tag_dir, hf_dir = resolve(checkpoint)
    adapter = os.path.join(tag_dir, "adapter")
    return (tag_dir, hf_dir, adapter) if os.path.isfile(os.path.join(adapter, MERGE_MAP)) else None


def base_of(adapter_dir: str) -> str:
    """The base model the adapter was trained on, as peft recorded it."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path") or ""
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise UserError(f"the adapter's base model {base!r} is not a model folder here", where=adapter_dir,
                        fix="pass the base model folder with --base")
    return base


def base_tensors(base: str) -> dict[str, tuple[str, str, tuple]]:
    """name -> (file, torch dtype name, shape) of the base folder's safetensors, in file order."""
    index = os.path.join(base, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(base) if n.endswith(".safetensors"))
    if not files:
        raise UserError("no safetensors weights in the base model folder", where=base,
                        fix="the base model must be a Hugging Face folder with *.safetensors")
    out = {}
    for name in files:
        for tensor, entry in read_header(os.path.join(base, name)).items():
            out[tensor] = (name, _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return out


def plan_deltas(layout: dict, adapter: Adapter, names: set[str]) -> dict[str, Delta]:
    """Output name -> its delta, for every output that an adapted weight feeds."""
    deltas = {}
    for target in adapter.targets:
        views = layout["views"].get(target)
        if views is None:
            raise UserError(f"the adapter trained {target}, which this model's name map does not know",
                            where=adapter.folder, fix="merge with the base model the adapter was trained on")
        block = math.prod(layout["shapes"][target][1:]) if adapter.targets[target]["experts"] else 0
        for name, offset, shape, stride in views:
            if name not in names:
                raise UserError(f"{name} (from the adapted {target}) is not in the base model folder",
                                where=adapter.folder, fix="merge with the base model the adapter was trained on")
            deltas[name] = Delta(target, offset, tuple(shape), tuple(stride), block)
    return deltas


def merged_tensor(base: str, files: dict, adapter: Adapter, deltas: dict[str, Delta], name: str):
    from safetensors import safe_open

    with safe_open(os.path.join(base, files[name][0]), framework="pt") as f:
        tensor = f.get_tensor(name)
    if name in deltas:
        tensor = (tensor.float() + adapter.delta(deltas[name])).to(tensor.dtype)
    return tensor


def merge(base: str, adapter_dir: str, out: str, *, hf_dir: str | None = None, force: bool = False,
          verify: bool = True, max_shard_bytes: int = 5 * 10**9, adapter_out: str | None = None) -> dict:
    """Write `out` = base + adapter and return its marker. `hf_dir` holds a saved name map (the SFT stage's
    `<output_dir>/hf`); without one it is computed from the base's config.json. `adapter_out`: also write
    the adapter there with per-expert names."""
    started = time.time()
    base, adapter_dir = os.path.abspath(base), os.path.abspath(adapter_dir)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise UserError("the base model folder has no config.json", where=base,
                        fix="give the Hugging Face folder the adapter was trained on (--base)")
    adapter = Adapter(adapter_dir)
    files = base_tensors(base)
    layout = load_layout(hf_dir if hf_dir and os.path.isfile(os.path.join(hf_dir, "config.json")) else base, log)
    layout = with_groups(layout, adapter.targets)      # routed experts trained in groups (training/experts.py)
    deltas = plan_deltas(layout, adapter, set(files))
    pieces = [Piece(n, n, 0, shape, tuple(_row_major(shape)), dtype) for n, (_, dtype, shape) in files.items()]
    shards = shards_of(pieces, max_shard_bytes)
    staging = Staging(out, force)
    plan_id = {"base": base, "adapter": adapter_dir, "adapter_sha256": _sha256(os.path.join(adapter_dir, ADAPTER_WEIGHTS)),
               "shards": [[name, [p.name for p in ps]] for name, ps in shards]}
    resumed = staging.prepare(plan_id)
    records = {name: rec for name, _ in shards if resumed and (rec := staging.finished(name))}
    todo = [(name, ps) for name, ps in shards if name not in records]
    staging.require_space(sum(p.nbytes for _, ps in todo for p in ps), discard=not records)
    log(f"merge: {len(files)} tensors, {len(deltas)} with a LoRA delta ({len(adapter.targets)} adapted weights); "
        f"{len(todo)} of {len(shards)} shards to write")
    for name, ps in todo:
        writer = ShardWriter(staging.path(name), [(p.name, p.dtype, p.shape, p.nbytes) for p in ps])
        try:
            for p in ps:
                writer.add(merged_tensor(base, files, adapter, deltas, p.name))
            records[name] = writer.close()
        except BaseException:
            writer.abort()
            raise
        staging.record(name, records[name])
    total = sum(p.nbytes for p in pieces)
    staging.write_index({p.name: name for name, ps in shards for p in ps}, total)
    with open(os.path.join(base, "config.json")) as f:
        write_json(staging.path("config.json"), json.load(f))
    side = staging.copy_side_files(base)
    checks = verify_merge(staging.dir, base, files, adapter, deltas, hf_dir) if verify else {}
    marker = {"source": base, "adapter": adapter_dir, "tensors": len(pieces), "merged": len(deltas),
              "total_size": total, "files": {name: records[name]["sha256"] for name, _ in shards}, "copied": side,
              "verify": checks, "seconds": round(time.time() - started, 2), "created": time.time()}
    staging.finalize(marker)
    if adapter_out:
        write_per_expert_adapter(adapter, layout, adapter_out)
    log(f"merge complete: {staging.out} ({len(pieces)} tensors, {total / 1e9:.3f} GB, {marker['seconds']} s)")
    return marker


def _row_major(shape: tuple) -> list[int]:
    return [math.prod(shape[i + 1:]) for i in range(len(shape))]


def _sha256(path: str) -> str:
    from .sfio import file_record

    return file_record(path)["sha256"]


def verify_merge(folder: str, base: str, files: dict, adapter: Adapter, deltas: dict, hf_dir: str | None) -> dict:
    """Every output tensor recomputed and compared bit for bit, then logits of the merged folder against the
    base with the adapter applied by peft (fp32 both; the merged weights were rounded to the base dtype)."""
    import torch
    from safetensors import safe_open

    with open(os.path.join(folder, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    if set(weight_map) != set(files):
        raise UserError(f"verification failed: tensors differ from the base ({sorted(set(files) ^ set(weight_map))[:5]})",
                        where=folder)
    for name, shard in weight_map.items():
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            if not torch.equal(f.get_tensor(name), merged_tensor(base, files, adapter, deltas, name)):
                raise UserError(f"verification failed: {name} differs from base + delta", where=folder)
    log(f"verify: {len(weight_map)} tensors equal base + LoRA delta")
    from .verify import _available_bytes

    need = sum(math.prod(shape) for _, _, shape in files.values()) * 4 * 2
    result = {"tensors": len(weight_map), "bytes": "equal"}
    if need > _available_bytes():
        result["logits"] = f"skipped: needs about {need / 2**30:.1f} GiB"
        return result
    result.update(check_logits(folder, base, adapter.folder))
    log(f"verify: logits within {result['logits_tolerance']:.3g} (max abs diff {result['logits_max_abs_diff']:.3g})")
    return result


def regroup_as_trained(model, adapter_dir: str) -> None:
    """The base with its routed experts in the groups the adapter was trained on (training/experts.py), so
    peft finds every target the adapter names."""
    from clusterctl.training.experts import regroup

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        names = json.load(f).get("target_parameters") or []
    groups = {int(m["group"]) for m in map(GROUPED.match, names) if m}
    if groups:
        regroup(model, max(groups) + 1)


def check_logits(folder: str, base: str, adapter_dir: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clusterctl.training.lora import exact_targets

    from .verify import PROMPT

    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    trained = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    regroup_as_trained(trained, adapter_dir)
    with exact_targets():
        ref = PeftModel.from_pretrained(trained, adapter_dir).eval()
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt")["input_ids"]
    ids = ids.clamp_(max=merged.config.vocab_size - 1)
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, ref(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    tol = 2 ** -6 * max(1.0, want.abs().max().item())     # weights rounded to bf16 (8 bits): about 1 %
    if not diff <= tol:
        raise UserError(f"verification failed: merged logits differ from base + adapter by {diff:.3g} "
                        f"(allowed {tol:.3g})", where=folder)
    return {"logits": "match", "logits_max_abs_diff": diff, "logits_tolerance": tol}


def write_per_expert_adapter(adapter: Adapter, layout: dict, out: str) -> dict:
    """The adapter in peft's format with one module per expert (`mlp.experts.N.gate_proj`, ...), as tools that
    know the standard per-expert layout expect (vLLM, llama.cpp's converter). Expert e of a fused weight gets
    lora_A = its rank block of A and lora_B = the rows of its B block that form that output; the product is
    exactly the merged delta. Written whole into `<out>.partial`, then renamed."""
    import shutil

    import torch
    from safetensors.torch import save_file

    tensors, modules = {}, []
    for target, info in adapter.targets.items():
        a, b = adapter.factors(target)
        if not info["experts"]:
            module = target.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
            modules.append(module)
            continue
        if info.get("layout") != "e o i":
            raise UserError(f"{target}: per-expert adapter names need experts stored [E, out, in]", where=adapter.folder)
        experts, (rows, cols) = info["experts"], layout["shapes"][target][1:]
        a_e = a.reshape(experts, -1, a.shape[-1])
        b_e = b.reshape(b.shape[0], -1, experts)
        for name, offset, shape, stride in layout["views"][target]:
            expert, inner = divmod(offset, rows * cols)
            if tuple(stride) != (cols, 1) or inner % cols or shape[1] != cols:
                raise UserError(f"{name} is not a row block of {target}", where=adapter.folder)
            first = inner // cols
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = a_e[expert].clone()   # gate and up share A_e
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_e[first:first + shape[0], :, expert].contiguous()
            modules.append(module)
    config = {**adapter.config, "target_modules": sorted(modules), "target_parameters": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.to(torch.float32) for k, v in tensors.items()}, os.path.join(tmp, ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    write_json(os.path.join(tmp, "adapter_config.json"), config)
    write_json(os.path.join(tmp, MARKER), {"source": adapter.folder, "modules": len(modules), "created": time.time()})
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"adapter: {out} ({len(modules)} modules, per-expert names)")
    return {"modules": len(modules)}


def merge_checkpoint(checkpoint: str, out: str, *, base: str | None, verify: bool, force: bool,
                     max_shard_bytes: int, node_rank: int) -> int:
    """The convert stage on a LoRA/QLoRA checkpoint: node 0 merges into `out` and writes the per-expert
    adapter to `<out>-adapter` (a merge reads the base once, so other nodes have nothing to share)."""
    if node_rank != 0:
        log(f"node {node_rank}: a LoRA merge runs on node 0 alone")
        return 0
    found = lora_checkpoint(checkpoint)
    if found is None:
        raise UserError("not a LoRA checkpoint (no adapter/ with its merge map)", where=checkpoint)
    _, hf_dir, adapter = found
    merge(base or base_of(adapter), adapter, out, hf_dir=hf_dir, force=force, verify=verify,
          max_shard_bytes=max_shard_bytes, adapter_out=os.path.abspath(out).rstrip("/") + "-adapter")
    return 0
