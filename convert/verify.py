"""Prove the converted folder equals what was trained.

1. Structure: the index, the shard headers and the plan agree (every tensor present, right shape and dtype,
   nothing extra).
2. Bytes: every output tensor equals its checkpoint slice, cast (bit for bit), streamed one at a time.
3. Behaviour: transformers loads the folder with no missing/unexpected/mismatched keys, and its logits on a
   fixed prompt match the model rebuilt from the checkpoint's master weights (exact in fp32; bf16: within
   bf16 rounding).  Needs two copies of the model in RAM, so it is skipped (and says so) when they do not fit.
"""
from __future__ import annotations

import json
import os

from clusterctl.errors import UserError

from .layout import DTYPES
from .sfio import SAFETENSORS_DTYPES, read_header
from .tensors import reference_extract

PROMPT = "The trained model and its converted copy must agree on every logit of this sentence."


def _fail(folder: str, what: str) -> UserError:
    return UserError(f"verification failed: {what}", where=folder,
                     fix="the unfinished output is kept for inspection; this is a converter bug or a config "
                         "that does not match the checkpoint")


def check_structure(folder: str, pieces) -> dict[str, str]:
    """Index vs headers vs plan; returns the weight map."""
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    found = {}
    for shard in sorted(set(weight_map.values())):
        for name, entry in read_header(os.path.join(folder, shard)).items():
            if weight_map.get(name) != shard:
                raise _fail(folder, f"{name} is in {shard} but the index says {weight_map.get(name)}")
            found[name] = entry
    expected = {p.name: p for p in pieces}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise _fail(folder, f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for name, p in expected.items():
        entry = found[name]
        if entry["shape"] != list(p.shape) or entry["dtype"] != SAFETENSORS_DTYPES[p.dtype]:
            raise _fail(folder, f"{name}: {entry['dtype']} {entry['shape']}, expected "
                                f"{SAFETENSORS_DTYPES[p.dtype]} {list(p.shape)}")
    return weight_map


def check_bytes(folder: str, ck, pieces, weight_map: dict[str, str]) -> None:
    import torch
    from safetensors import safe_open

    by_shard: dict[str, list] = {}
    for p in pieces:
        by_shard.setdefault(weight_map[p.name], []).append(p)
    for shard, ps in by_shard.items():
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            for p in ps:
                if not torch.equal(f.get_tensor(p.name), reference_extract(ck, p)):
                    raise _fail(folder, f"{p.name} in {shard} differs from {p.source} in the checkpoint")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def regroup_like(model, ck) -> None:
    """The reference model with its routed experts in the groups the checkpoint was trained with
    (training/experts.py), so its state-dict names are the checkpoint's."""
    from clusterctl.training.experts import regroup

    from .layout import GROUPED

    groups = {int(m["group"]) for m in map(GROUPED.match, ck.params) if m}
    if groups:
        regroup(model, max(groups) + 1)


def check_logits(folder: str, ck, dtype: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, DTYPES[dtype])
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise _fail(folder, f"transformers reports {problems}")
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch_dtype)
    regroup_like(ref, ck)
    with torch.no_grad():
        for name, tensor in ref.state_dict().items():
            tensor.copy_(ck.read(name).view(tensor.shape))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].clamp_(max=model.config.vocab_size - 1)
    model.eval()
    ref.eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()
    diff = (got - want).abs().max().item()
    # bf16 keeps 8 significant bits: allow two units in the last place of the largest logit.
    tol = 0.0 if dtype == "fp32" else 2 * 2.0 ** (torch.log2(want.abs().max()).floor().item() - 7)
    if not diff <= tol:
        raise _fail(folder, f"logits differ by {diff:.3g} (allowed {tol:.3g}) on the fixed prompt")
    return {"logits_max_abs_diff": diff, "logits_tolerance": tol, "prompt_tokens": ids.shape[1]}


def verify_folder(folder: str, ck, pieces, dtype: str, log) -> dict:
    weight_map = check_structure(folder, pieces)
    log(f"verify: {len(pieces)} tensors present with the expected shapes and dtypes")
    check_bytes(folder, ck, pieces, weight_map)
    log("verify: every tensor equals its checkpoint slice bit for bit")
    result = {"tensors": len(pieces), "structure": "ok", "bytes": "equal"}
    params = sum(ck.params[n].numel for n in ck.params)
    need = params * (4 + 2 * (4 if dtype == "fp32" else 2))
    if need > _available_bytes():
        result["logits"] = f"skipped: needs about {need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} free"
        log(f"verify: logits {result['logits']}")
        return result
    result.update(check_logits(folder, ck, dtype))
    result["logits"] = "match"
    log(f"verify: logits match (max abs diff {result['logits_max_abs_diff']:.3g})")
    return result
