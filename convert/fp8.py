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

from clusterctl import modelconfig
from clusterctl.errors import UserError

from .sfio import ShardWriter, read_header
from .staging import INDEX, Staging, write_json

SCALE = "_scale_inv"
DOWNLOAD_AGAIN = "the download is damaged: download the FP8 model folder again"
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
    if not isinstance(q, dict) or q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"config.json has no fp8 e4m3 quantization_config (found {q or 'none'})",
                        where="config.json", fix="pass the folder of DeepSeek-V3/R1's released FP8 weights")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"quantization_config.weight_block_size must be two whole numbers above 0, found {block}",
                        where="config.json", fix=DOWNLOAD_AGAIN)
    return block[0], block[1]


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
            if e["dtype"] not in by_code:
                raise UserError(f"{name}: safetensors dtype {e['dtype']} is not one this cast reads "
                                f"({', '.join(sorted(by_code))})", where=os.path.join(src, f),
                                fix="pass the folder of DeepSeek-V3/R1's released FP8 weights")
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


def _weight_map(src: str) -> dict[str, str]:
    """Tensor name -> shard file, from the index (or the single model.safetensors)."""
    index_path = os.path.join(src, INDEX)
    if not os.path.isfile(index_path):
        return {n: "model.safetensors" for n in read_header(os.path.join(src, "model.safetensors"))}
    try:
        with open(index_path, "rb") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise UserError(f"not a safetensors index ({type(exc).__name__}: {str(exc)[:120]})", where=index_path,
                        fix=DOWNLOAD_AGAIN) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError("weight_map is not an object of tensor name -> file name", where=index_path,
                        fix=DOWNLOAD_AGAIN)
    return weight_map


def cast_folder(src: str, out: str, force: bool = False) -> dict:
    """Dequantise every shard of `src` into `out` (staged, resumable, marker last); returns the marker."""
    started = time.time()
    src = os.path.abspath(src)
    config_path = os.path.join(src, "config.json")
    if not os.path.isfile(config_path):
        raise UserError("config.json is missing", where=src, fix="pass the downloaded FP8 model folder")
    config = modelconfig.read(config_path, fix=DOWNLOAD_AGAIN)
    block = _block_size(config)
    where = _weight_map(src)
    files = sorted(set(where.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise UserError(f"shards named by the index are missing: {', '.join(missing[:5])}", where=src,
                        fix="finish the download")
    plan = _shard_plan(src, files)
    staging = Staging(out, force)
    fingerprint = {"source": src, "files": {f: os.path.getsize(os.path.join(src, f)) for f in files}}
    resumed = staging.prepare(fingerprint)
    total = sum(e[3] for entries in plan.values() for e in entries)
    staging.require_space(total + (64 << 20), discard=False)
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
    staging.write_index({e[0]: f for f, entries in plan.items() for e in entries}, total)
    config.pop("quantization_config")
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    write_json(staging.path("config.json"), config)
    copied = staging.copy_side_files(src)
    marker = {"source": src, "dtype": "bfloat16", "files": {f: r["sha256"] for f, r in records.items()},
              "copied": copied, "seconds": round(time.time() - started, 2), "created": time.time()}
    staging.finalize(marker)
    log(f"complete: {staging.out} ({len(files)} shards, {marker['seconds']} s)")
    return marker
