"""Benchmark: clusterctl's streaming converter against the tools people use, in one run, one table.

Real ZeRO-3 checkpoints are written by DeepSpeed on 2 CPU ranks (one training step) for DeepSeek-V3-
architecture models of ~100M parameters and, with --large, ~400M (training that one needs ~13 GiB).
Every tool runs as its own process on a warm page cache (the converter and cp also on an emptied one, as
a 7.4 TB checkpoint is always read: root only); wall time, throughput (fp32 weight bytes per
second: what every converter must read) and peak memory (max RSS and peak anonymous memory, sampled
over the process tree) are printed with ratios.  The FP8 -> BF16 cast is compared with the official
per-block dequantisation (same bits, time, memory).

    OMP_NUM_THREADS=1 .venv/bin/python bench/convert/bench_convert.py [--large] [--work DIR] [--keep]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
MAKE = os.path.join(ROOT, "tests", "convert", "make_checkpoint.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "convert"))

from measure import measure  # noqa: E402

PY = sys.executable
SIZES = {"100M": ["--layers", "13", "--hidden", "512", "--experts", "16"],
         "400M": ["--layers", "14", "--hidden", "1024", "--experts", "16"]}
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
GiB = 2 ** 30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, **kw)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def checkpoint(work: str, size: str) -> str:
    """A real ZeRO-3 checkpoint (cached in the work folder: it takes a minute or more to train)."""
    ck = os.path.join(work, size, "checkpoints")
    if glob.glob(os.path.join(ck, "*", "clusterctl-complete.json")):
        return ck
    from clusterctl.convert.swap import meminfo

    free = meminfo()["MemAvailable"]
    if size == "400M" and free < 16 * GiB:
        sys.exit(f"building the 400M checkpoint peaks near 13 GiB; only {free / GiB:.1f} GiB available now")
    base = os.path.join(work, size, "base")
    shutil.rmtree(os.path.join(work, size), ignore_errors=True)
    print(f"building the {size} checkpoint (DeepSpeed ZeRO-3, 2 CPU ranks, 1 step) ...", flush=True)
    _check([PY, MAKE, "--build-base", base, *SIZES[size]], timeout=1800)
    _check([os.path.join(os.path.dirname(PY), "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_port()), MAKE, "--base", base, "--out", ck, "--steps", "1", "--tag", "step1"],
           timeout=3600)
    shutil.rmtree(base)
    return ck


def warm(folder: str) -> None:
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def without_name_map(ck: str) -> str:
    """The same checkpoint as another tool would leave it: its tag linked, hf/ without the name map the SFT
    stage saves (so the converter imports transformers and builds the model on meta to map names)."""
    from clusterctl.convert.layout import LAYOUT_FILE

    foreign = os.path.join(os.path.dirname(ck), "foreign")
    shutil.rmtree(foreign, ignore_errors=True)
    os.makedirs(foreign)
    tag = _tag(ck)
    os.symlink(tag, os.path.join(foreign, os.path.basename(tag)))
    shutil.copytree(os.path.join(ck, "hf"), os.path.join(foreign, "hf"), ignore=shutil.ignore_patterns(LAYOUT_FILE))
    return foreign


def _tag(ck: str) -> str:
    return glob.glob(os.path.join(ck, "*", "clusterctl-complete.json"))[0].rsplit("/", 1)[0]


def tools(ck: str, work: str) -> list[tuple[str, list[str], bool, str]]:
    """(label, command, writes the standard per-expert names vLLM loads, output folder)."""
    tag = _tag(ck)
    foreign = without_name_map(ck)

    def ours(*extra, checkpoint=ck, verify="--no-verify"):
        return lambda out: [PY, "-m", "clusterctl.convert", "--checkpoint", checkpoint, "--out", out, verify, *extra]

    listed = [
        ("(a) clusterctl convert, bf16", ours(), True),
        ("(a) clusterctl convert, bf16, no saved name map", ours(checkpoint=foreign), True),
        ("(a) clusterctl convert, fp32", ours("--dtype", "fp32"), True),
        ("(a) clusterctl convert, bf16, 2 workers", ours("--workers", "2", "--max-shard-size", "100MB"), True),
        ("(a) clusterctl convert, bf16 + --verify", ours(verify="--verify"), True),
        ("(b) zero_to_fp32 + save_pretrained",
         lambda out: [PY, os.path.join(HERE, "reference_tools.py"), "save-pretrained", ck, out], True),
        ("(c) zero_to_fp32.py --safe_serialization",
         lambda out: [PY, os.path.join(ck, "zero_to_fp32.py"), ck, out, "--safe_serialization"], False),
        ("(d) cp -r of the checkpoint tag", lambda out: ["cp", "-r", tag, out], False),
        ("(d) cp -r + fsync of the copies",
         lambda out: ["sh", "-c", 'cp -r "$1" "$2" && sync "$2"/*', "sh", tag, out], False),
    ]
    return [(label, cmd(os.path.join(work, f"out-{i}")), servable, os.path.join(work, f"out-{i}"))
            for i, (label, cmd, servable) in enumerate(listed)]


def fp32_weight_bytes(ck: str) -> int:
    from clusterctl.convert.checkpoint import ZeroCheckpoint, resolve

    z = ZeroCheckpoint(resolve(ck)[0])
    return 4 * sum(p.numel for p in z.params.values())


def tree_bytes(folder: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
               if os.path.isfile(p))


def same_tensors(a: str, b: str) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for f in glob.glob(os.path.join(folder, "*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for name in ia:
        with safe_open(ia[name], "pt") as ha, safe_open(ib[name], "pt") as hb:
            if not torch.equal(ha.get_tensor(name), hb.get_tensor(name)):
                return False
    return True


COLD = ("(a) clusterctl convert, bf16", "(d) cp -r of the checkpoint tag", "(d) cp -r + fsync of the copies")
COLD_SUFFIX = ", cold cache"


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Empty the page cache (root only): the checkpoint, and each tool's own code, come from the disk, as
    they do for a 7.4 TB checkpoint that no page cache holds."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def interleaved(jobs: list[tuple[str, list[str], str, bool]], src: str, repeat: int, keep=()) -> tuple[dict, dict]:
    """Run every (label, command, output folder, cold) job once per round, `repeat` rounds, so that the
    shared machine's slow spells fall on every tool alike; each on a warm page cache (or, with cold, an
    emptied one) and no dirty pages.  Returns per label the fastest run (the tool's own cost) with the
    largest memory peaks seen over all its runs, and its output's size.  Outputs are removed as soon as
    they are measured (cached outputs would crowd the next tool's page cache), but the folders in `keep`."""
    runs: dict[str, list] = {label: [] for label, *_ in jobs}
    out_bytes = {}
    for _ in range(repeat):
        for label, cmd, out, cold in jobs:
            shutil.rmtree(out, ignore_errors=True)
            if cold:
                drop_caches()
            else:
                warm(src)
                os.sync()
            m = measure(cmd, env=ENV)
            if m.returncode:
                sys.exit(f"{label} failed:\n{m.output[-3000:]}")
            runs[label].append(m)
            out_bytes[label] = tree_bytes(out)
            if out not in keep:
                shutil.rmtree(out, ignore_errors=True)
    best = {}
    for label, measured in runs.items():
        best[label] = min(measured, key=lambda m: m.wall_s)
        best[label].peak_rss = max(m.peak_rss for m in measured)
        best[label].peak_anon = max(m.peak_anon for m in measured)
    return best, out_bytes


def bench_size(work: str, size: str, rows: list, repeat: int) -> dict:
    ck = checkpoint(work, size)
    weights = fp32_weight_bytes(ck)
    ck_bytes = tree_bytes(_tag(ck))
    listed = tools(ck, work)
    jobs = [(label, cmd, out, False) for label, cmd, _, out in listed]
    if can_drop_caches():
        jobs += [(label + COLD_SUFFIX, cmd, out, True) for label, cmd, _, out in listed if label in COLD]
    compared = ("(a) clusterctl convert, bf16", "(b) zero_to_fp32 + save_pretrained")
    outs = {label: out for label, _, _, out in listed}
    results, out_bytes = interleaved(jobs, ck, repeat, keep=[outs[label] for label in compared])
    servable = {label: yes for label, _, yes, _ in listed}
    for label, *_ in jobs:
        m = results[label]
        moved = ck_bytes if label.startswith("(d)") else weights
        rows.append((size, label, m.wall_s, moved / m.wall_s / 1e9, m.peak_rss / GiB, m.peak_anon / GiB,
                     out_bytes[label] / 1e9, "yes" if servable[label.removesuffix(COLD_SUFFIX)] else "no"))
    same = same_tensors(*(outs[label] for label in compared))
    print(f"{size}: clusterctl output equals zero_to_fp32 + save_pretrained tensor for tensor: {same}")
    for label in compared:
        shutil.rmtree(outs[label])
    return {"params": weights // 4, "weights": weights, "ck_bytes": ck_bytes, "m": results}


def bench_fp8(work: str, rows: list, repeat: int) -> None:
    from fp8_reference import make_fp8_folder

    src = os.path.join(work, "fp8")
    if not os.path.exists(os.path.join(src, "config.json")):
        shapes = {f"model.layers.{i}.mlp.experts.{e}.{p}.weight": (2048, 1024) if p != "down_proj" else (1024, 2048)
                  for i in range(2) for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
        shapes["model.embed_tokens.weight"] = (4096, 1024)
        make_fp8_folder(src, shapes, shards=4)
    fp8_bytes = tree_bytes(src)
    ours, official = os.path.join(work, "fp8-ours"), os.path.join(work, "fp8-official")
    jobs = [("clusterctl fp8-to-bf16", [PY, "-m", "clusterctl.cli", "fp8-to-bf16", src, ours], ours, False),
            ("official per-block (fp8_cast_bf16.py, CPU)",
             [PY, os.path.join(HERE, "reference_tools.py"), "fp8-official", src, official], official, False)]
    results, out_bytes = interleaved(jobs, src, repeat, keep=(ours, official))
    for label, *_ in jobs:
        m = results[label]
        rows.append(("fp8", label, m.wall_s, fp8_bytes / m.wall_s / 1e9, m.peak_rss / GiB, m.peak_anon / GiB,
                     out_bytes[label] / 1e9, "-"))
    print(f"fp8: clusterctl output equals the official dequantisation bit for bit: {same_tensors(ours, official)}")
    for out in (ours, official):
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/clusterctl-bench-convert")
    p.add_argument("--large", action="store_true", help="also the ~400M model (training it peaks near 13 GiB)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for the next run")
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool; the fastest is reported")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rows, sizes = [], {}
    try:
        for size in ["100M"] + (["400M"] if a.large else []):
            sizes[size] = bench_size(a.work, size, rows, a.repeat)
        if not a.skip_fp8:
            bench_fp8(a.work, rows, a.repeat)
    finally:
        if not a.keep:
            shutil.rmtree(a.work, ignore_errors=True)
    report(rows, sizes)


def report(rows: list, sizes: dict) -> None:
    head = f"{'model':6} {'tool':50} {'wall s':>7} {'GB/s':>6} {'maxRSS GiB':>10} {'anon GiB':>9} {'out GB':>7} servable"
    print("\nwarm page cache (cold: emptied before each run), no dirty pages at start; wall = fastest run; memory = "
          "largest peak over all runs; clusterctl fsyncs its output, (b), (c) and plain cp do not")
    print("\n" + head + "\n" + "-" * len(head))
    for size, label, wall, gbs, rss, anon, out, servable in rows:
        print(f"{size:6} {label:50} {wall:7.2f} {gbs:6.2f} {rss:10.2f} {anon:9.2f} {out:7.3f} {servable}")
    print()
    ours_label, no_map_label = "(a) clusterctl convert, bf16", "(a) clusterctl convert, bf16, no saved name map"
    cp_labels = ("(d) cp -r of the checkpoint tag", "(d) cp -r + fsync of the copies")
    for size, s in sizes.items():
        m = s["m"]
        b, c = m["(b) zero_to_fp32 + save_pretrained"], m["(c) zero_to_fp32.py --safe_serialization"]
        cp_rates = [s["ck_bytes"] / m[label].wall_s for label in cp_labels]
        print(f"{size} ({s['params'] / 1e6:.0f}M params, {s['weights'] / 1e9:.2f} GB fp32 weights, checkpoint "
              f"{s['ck_bytes'] / 1e9:.2f} GB): peak anon {m[ours_label].peak_anon / GiB:.2f} GiB vs (b) "
              f"{b.peak_anon / GiB:.2f} GiB, (c) {c.peak_anon / GiB:.2f} GiB")
        for label in (ours_label, no_map_label):
            rate = s["weights"] / m[label].wall_s
            print(f"  {label}: wall vs (c) {m[label].wall_s / c.wall_s:.2f}x, vs (b) {m[label].wall_s / b.wall_s:.2f}x;"
                  f" throughput vs cp {rate / cp_rates[0]:.2f}, vs cp + fsync {rate / cp_rates[1]:.2f}")
        if ours_label + COLD_SUFFIX in m:
            rate = s["weights"] / m[ours_label + COLD_SUFFIX].wall_s
            cold_cp = [s["ck_bytes"] / m[label + COLD_SUFFIX].wall_s for label in cp_labels]
            print(f"  {ours_label}{COLD_SUFFIX}: throughput vs cp{COLD_SUFFIX} {rate / cold_cp[0]:.2f}, "
                  f"vs cp + fsync{COLD_SUFFIX} {rate / cold_cp[1]:.2f}")
        written = re.search(r"wrote \d+ shards, [\d.]+ GB in ([\d.]+) s", m[ours_label].output)
        if written and float(written.group(1)) > 0:
            rate = s["weights"] / float(written.group(1))
            print(f"  shard writing alone (after imports and planning): {rate / 1e9:.2f} GB/s of fp32 weights, "
                  f"{rate / cp_rates[0]:.2f} of cp's rate")
    if len(sizes) == 2:
        (_, small), (_, large) = sizes.items()
        for label in (ours_label, "(b) zero_to_fp32 + save_pretrained"):
            print(f"peak anon growth 100M -> 400M, {label}: "
                  f"{large['m'][label].peak_anon / small['m'][label].peak_anon:.2f}x")


if __name__ == "__main__":
    main()
