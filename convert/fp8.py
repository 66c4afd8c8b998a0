"""DeepSeek-V3's released FP8 weights -> BF16, shard by shard, on CPU (GPU when present).

The release stores linear weights as float8 e4m3 with one fp32 scale per 128x128 block in
`<name>_scale_inv` (the multiplier that dequantises), announced by config.json's quantization_config.
Training needs BF16.  The official script needs a GPU (Triton); this is the same arithmetic in torch,
streamed a row band at a time into the same shard names, with the output staged and marked like the
converter's.
"""
from __future__ import annotations

import json
import math
import os
import time

from clusterctl.errors import UserError

from .sfio import ShardWriter, read_header
from .staging import Staging, atomic_write, write_json

INDEX = "model.safetensors.index.json"
SCALE = "_scale_inv"
BAND_ROWS = 2048              # about this many rows dequantised at once: bounds memory for any width


def log(msg: str) -> None:
    print(f"[fp8-to-bf16] {msg}", flush=True)


def dequantize(weight, scale_inv, block: tuple[int, int] = (128, 128), device: str = "cpu"):
    """weight (fp8 [M, N]) * its block scales (fp32 [ceil(M/bm), ceil(N/bn)]) -> bf16, computed in fp32
    (one multiply per element, as the official kernel: the same bits)."""
    import torch

    bm, bn = block
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != (-(-rows // bm), -(-cols // bn)):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not tile weight {tuple(weight.shape)} "
                         f"in {bm}x{bn} blocks")
    full = cols // bn * bn
    out = torch.empty((rows, cols), dtype=torch.bfloat16)
    step = bm * max(1, BAND_ROWS // bm)                 # bands start on a block boundary
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        band = weight[r0:r1].to(device).to(torch.float32)
        s = scale_inv[r0 // bm: -(-r1 // bm)].to(device, torch.float32).repeat_interleave(bm, 0)[: r1 - r0]
        band[:, :full].view(r1 - r0, full // bn, bn).mul_(s[:, : full // bn, None])
        band[:, full:].mul_(s[:, full // bn:])         # the last, narrower column block (if any)
        out[r0:r1] = band.to(torch.bfloat16).cpu()
    return out


def _block_size(config: dict) -> tuple[int, int]:
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"config.json has no fp8 e4m3 quantization_config (found {q or 'none'})",
                        where="config.json", fix="pass the folder of DeepSeek-V3/R1's released FP8 weights")
    return tuple(q.get("weight_block_size", (128, 128)))


def _shard_plan(src: str, files: list[str]) -> dict[str, list[tuple[str, str, tuple, int]]]:
    """For each shard, its output entries (name, dtype, shape, nbytes): fp8 weights become bf16, scales go."""
    from .sfio import SAFETENSORS_DTYPES

    by_code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    headers = {f: read_header(os.path.join(src, f)) for f in files}
    names = {n for h in headers.values() for n in h}
    plan = {}
    for f, header in headers.items():
        entries = []
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            shape, dtype = tuple(e["shape"]), by_code[e["dtype"]]
            if name.endswith(SCALE):
                if name[: -len(SCALE)] not in names:
                    raise UserError(f"{name} has no weight {name[:-len(SCALE)]}", where=os.path.join(src, f),
                                    fix="the checkpoint is incomplete: download it again")
                continue
            if dtype == "float8_e4m3fn":
                if name + SCALE not in names:
                    raise UserError(f"fp8 tensor {name} has no {name + SCALE}", where=os.path.join(src, f),
                                    fix="the checkpoint is incomplete: download it again")
                dtype = "bfloat16"
            entries.append((name, dtype, shape, math.prod(shape) * _itemsize(dtype)))
        plan[f] = entries
    return plan


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_shard(src: str, staging: Staging, f: str, entries, where: dict[str, str], block, device) -> dict:
    from safetensors import safe_open

    writer = ShardWriter(staging.path(f), entries)
    handles = {}

    def get(name):
        shard = where[name]
        if shard not in handles:
            handles[shard] = safe_open(os.path.join(src, shard), framework="pt")
        return handles[shard].get_tensor(name)

    try:
        for name, _, _, _ in entries:
            tensor = get(name)
            if str(tensor.dtype) == "torch.float8_e4m3fn":
                tensor = dequantize(tensor, get(name + SCALE), block, device)
            writer.add(tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def cast_folder(src: str, out: str, force: bool = False) -> dict:
    """Dequantise every shard of `src` into `out` (staged, resumable, marker last); returns the marker."""
    started = time.time()
    src = os.path.abspath(src)
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise UserError("config.json is missing", where=src, fix="pass the downloaded FP8 model folder")
    with open(config_path) as f:
        config = json.load(f)
    block = _block_size(config)
    index_path = os.path.join(src, INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            where = json.load(f)["weight_map"]
    else:
        where = {n: "model.safetensors" for n in read_header(os.path.join(src, "model.safetensors"))}
    files = sorted(set(where.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise UserError(f"shards named by the index are missing: {', '.join(missing[:5])}", where=src,
                        fix="finish the download")
    plan = _shard_plan(src, files)
    staging = Staging(out, force)
    fingerprint = {"source": src, "files": {f: os.path.getsize(os.path.join(src, f)) for f in files}}
    resumed = staging.prepare(fingerprint)
    need = sum(e[3] for entries in plan.values() for e in entries) + (64 << 20)
    free = staging.free_bytes()
    if need > free:
        raise UserError(f"not enough disk space: the output needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB "
                        "free", where=staging.dir, fix="free space or choose another output folder")
    device = _device()
    records = {}
    for i, f in enumerate(files):
        rec = staging.finished(f) if resumed else None
        if rec is None:
            t0 = time.time()
            rec = _write_shard(src, staging, f, plan[f], where, block, device)
            staging.record(f, rec)
            log(f"{f} ({i + 1}/{len(files)}): {rec['size'] / 1e9:.3f} GB in {time.time() - t0:.1f} s on {device}")
        records[f] = rec
    weight_map = {e[0]: f for f, entries in plan.items() for e in entries}
    write_json(staging.path(INDEX), {"metadata": {"total_size": sum(e[3] for es in plan.values() for e in es)},
                                     "weight_map": weight_map})
    config.pop("quantization_config")
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    write_json(staging.path("config.json"), config)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name not in ("config.json", INDEX) and not name.endswith(".safetensors"):
            with open(path, "rb") as fh:
                atomic_write(staging.path(name), fh.read())
            copied.append(name)
    marker = {"source": src, "dtype": "bfloat16", "files": {f: r["sha256"] for f, r in records.items()},
              "copied": copied, "seconds": round(time.time() - started, 2), "created": time.time()}
    staging.finalize(marker)
    log(f"complete: {staging.out} ({len(files)} shards, {marker['seconds']} s)")
    return marker
