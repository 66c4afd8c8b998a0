"""ZeRO checkpoint -> Hugging Face folder: plan, write shards (optionally in K processes), verify, swap in."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

from clusterctl import modelconfig
from clusterctl.atomic import MARKER
from clusterctl.errors import UserError

from . import nodes as nodes_
from .checkpoint import ZeroCheckpoint, resolve
from .layout import DTYPES, LAYOUT_FILE, Piece, load_layout, plan
from .sfio import ShardWriter
from .staging import Staging, write_json
from .tensors import extract


def log(msg: str) -> None:
    print(f"[convert] {msg}", file=sys.stderr, flush=True)


def shards_of(pieces: list[Piece], max_bytes: int) -> list[tuple[str, list[Piece]]]:
    """Consecutive pieces packed into files of at most max_bytes (a bigger tensor gets a file alone)."""
    groups: list[list[Piece]] = [[]]
    size = 0
    for p in pieces:
        if groups[-1] and size + p.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_shard(ck: ZeroCheckpoint, path: str, pieces: list[Piece]) -> dict:
    writer = ShardWriter(path, [(p.name, p.dtype, p.shape, p.nbytes) for p in pieces])
    try:
        for p in pieces:
            writer.add(extract(ck, p))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


_worker_ck: ZeroCheckpoint | None = None


def _init_worker(tag_dir: str) -> None:
    """Each worker process maps the rank files once and keeps them for all its shards."""
    global _worker_ck
    _worker_ck = ZeroCheckpoint(tag_dir)


def _worker_shard(path: str, pieces: list[Piece]) -> dict:
    assert _worker_ck is not None, "the pool initializer maps the checkpoint first"
    return write_shard(_worker_ck, path, pieces)


def run_shards(ck: ZeroCheckpoint, jobs: list[tuple[str, list[Piece]]], workers: int, done) -> None:
    """Write every shard, calling done(path, record) as each one finishes (so an interruption loses
    only the shards in flight)."""
    if workers <= 1 or len(jobs) <= 1:
        for path, pieces in jobs:
            done(path, write_shard(ck, path, pieces))
        return
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn"),
                             initializer=_init_worker, initargs=(ck.tag_dir,)) as pool:
        futures = {pool.submit(_worker_shard, path, pieces): path for path, pieces in jobs}
        for future in as_completed(futures):
            done(futures[future], future.result())


def output_config(hf_dir: str, dtype: str) -> dict:
    """The trained model's config.json, made servable: no quantization_config, dtype set, topk_method kept."""
    cfg = modelconfig.read(os.path.join(hf_dir, "config.json"),
                           fix="the SFT stage copies it from the base model: correct the base model's config.json")
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = DTYPES[dtype]
    if cfg.get("model_type") == "deepseek_v3":
        cfg.setdefault("topk_method", "noaux_tc")   # transformers 5 drops it; vLLM needs it (RECIPES §3.4)
    return cfg


def fingerprint(tag_dir: str, dtype: str, shards: list) -> dict:
    with open(os.path.join(tag_dir, MARKER), "rb") as f:
        marker = hashlib.sha256(f.read()).hexdigest()
    layout = hashlib.sha256(json.dumps([[name, [(p.name, p.dtype, p.shape) for p in ps]]
                                        for name, ps in shards]).encode()).hexdigest()
    return {"checkpoint": tag_dir, "checkpoint_marker_sha256": marker, "dtype": dtype, "layout_sha256": layout}


def resolve_with_config(checkpoint: str) -> tuple[str, str]:
    """(tag folder, hf folder), refusing early when the trained model's config.json is not there."""
    tag_dir, hf_dir = resolve(checkpoint)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise UserError("config.json of the trained model is missing", where=hf_dir,
                        fix="the SFT stage writes config.json, generation_config.json and tokenizer files there")
    return tag_dir, hf_dir


def open_and_plan(tag_dir: str, hf_dir: str, dtype: str) -> tuple[ZeroCheckpoint, list[Piece]]:
    """The mapped checkpoint and the output tensors it becomes (shared with the swap sizing)."""
    ck = ZeroCheckpoint(tag_dir)
    log(f"checkpoint {tag_dir}: ZeRO-{ck.stage}, {ck.world} ranks, {len(ck.params)} parameters")
    names = list(ck.params) + list(ck.buffers) + list(ck.shared)
    pieces = plan(load_layout(hf_dir, log), {n: ck.shape(n) for n in names}, {n: ck.dtype(n) for n in names},
                  dtype, aliases=set(ck.shared))
    return ck, pieces


def convert(checkpoint: str, out: str, dtype: str = "bf16", verify: bool = True, workers: int = 1,
            force: bool = False, max_shard_bytes: int = 5 * 10**9, nodes: int = 1, node_rank: int = 0,
            wait_timeout: float = 3600) -> dict | None:
    """Convert and return the marker written into the finished folder (None on nodes other than 0,
    which only write their share of the shards)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix=f"use one of {', '.join(DTYPES)}")
    started = time.time()
    tag_dir, hf_dir = resolve_with_config(checkpoint)
    staging = Staging(out, force)
    ck, pieces = open_and_plan(tag_dir, hf_dir, dtype)
    shards = shards_of(pieces, max_shard_bytes)
    plan_id = fingerprint(tag_dir, dtype, shards)
    mine = [s for i, s in enumerate(shards) if i % nodes == node_rank]
    if node_rank == 0:
        resumed = staging.prepare(plan_id)
    else:
        resumed, me = True, nodes_.join(staging, plan_id, node_rank, wait_timeout)
    records = {name: rec for name, _ in mine if resumed and (rec := staging.finished(name))}
    todo = [(staging.path(name), ps) for name, ps in mine if name not in records]
    staging.require_space(sum(p.nbytes for _, ps in todo for p in ps),
                          discard=not records and node_rank == 0)
    peers = nodes_.admit(staging, nodes, wait_timeout) if node_rank == 0 and nodes > 1 else {}
    if records:
        log(f"resuming: {len(records)} of {len(shards)} shards already written and verified by hash")
    t0 = time.time()

    def done(path: str, rec: dict) -> None:
        records[os.path.basename(path)] = rec
        staging.record(os.path.basename(path), rec)

    run_shards(ck, todo, workers, done)
    written = sum(p.nbytes for _, ps in todo for p in ps)
    log(f"wrote {len(todo)} shards, {written / 1e9:.3f} GB in {time.time() - t0:.2f} s")
    if node_rank != 0:
        nodes_.report_done(staging, me, records)
        log(f"node {node_rank}: {len(mine)} shards done; node 0 finishes the folder")
        return None
    records.update(nodes_.collect(staging, peers, wait_timeout))
    total = sum(p.nbytes for p in pieces)
    staging.write_index({p.name: name for name, ps in shards for p in ps}, total)
    write_json(staging.path("config.json"), output_config(hf_dir, dtype))
    side = staging.copy_side_files(hf_dir, skip=(LAYOUT_FILE,))
    checks = {}
    if verify:
        from .verify import verify_folder
        checks = verify_folder(staging.dir, ck, pieces, dtype, log)
    marker = {"source": tag_dir, "dtype": DTYPES[dtype], "tensors": len(pieces), "total_size": total,
              "files": {name: records[name]["sha256"] for name, _ in shards}, "copied": side,
              "verify": checks, "seconds": round(time.time() - started, 2), "created": time.time()}
    staging.finalize(marker)
    log(f"complete: {staging.out} ({len(pieces)} tensors, {total / 1e9:.3f} GB, {marker['seconds']} s)")
    return marker

