"""LoRA against full SFT, and the streaming merge against peft, on DeepSeek-V3-architecture models of ~100M
parameters (and ~400M with --large; full SFT of that one needs ~13 GiB): 2 CPU ranks under ZeRO-3.

    .venv/bin/python bench/lora/bench_lora.py [--large] [--work DIR]

Rows: step time (median of steps 2..N, from metrics.jsonl) and peak anonymous memory of the whole rank tree
for full SFT and LoRA (every target group, rank 8); the checkpoint's size (full: ZeRO shards with optimizer
states; LoRA: adapter-only shards + the peft adapter); the merge's wall time and peak anonymous memory,
`python -m clusterctl.convert` (streaming, --no-verify) against peft's load + merge_and_unload +
save_pretrained, with the ratio.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "bench", "convert"))
from measure import measure  # noqa: E402  (bench/convert/measure.py: process-tree peak RSS / anon sampler)

from clusterctl.training.tiny import build_tiny_model  # noqa: E402

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# bench/convert's two sizes, built with the tiny model's DeepSeek tokenizer (the SFT stage trains in its format)
SIZES = {"100M": {"num_hidden_layers": 13, "hidden_size": 512}, "400M": {"num_hidden_layers": 14, "hidden_size": 1024}}
STEPS = 4
MiB = 2 ** 20

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from clusterctl.training.lora import exact_targets
base, adapter, out = sys.argv[1:]
with exact_targets():
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
model.merge_and_unload().save_pretrained(out)
"""


def run_sft(work: str, base: str, method: str) -> dict:
    folder = os.path.join(work, method)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    config = {"model": base, "output_dir": os.path.join(folder, "checkpoints"),
              "metrics_file": os.path.join(folder, "metrics.jsonl"), "max_length": 256, "micro_batch": 1,
              "grad_accum": 1, "max_steps": STEPS, "save_steps": STEPS, "lr": 1e-4, "warmup_ratio": 0.0,
              "offload_optimizer": False, "offload_param": False, "method": method,
              "lora": {"rank": 8, "alpha": 16, "targets": ["all"]}}
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(config, f)
    m = measure([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(29400 + os.getpid() % 500), "-m", "clusterctl.training.sft", "--config", path],
                env=ENV)
    if m.returncode:
        sys.exit(f"{method} SFT failed:\n{m.output[-3000:]}")
    with open(config["metrics_file"]) as f:
        times = [json.loads(line)["time"] for line in f if line.strip()]
    tag = os.path.join(config["output_dir"], f"step-{STEPS}")
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(tag, "**", "*"), recursive=True)
               if os.path.isfile(p))
    return {"step_s": statistics.median(b - a for a, b in zip(times, times[1:])), "peak_anon": m.peak_anon,
            "checkpoint": size, "output_dir": config["output_dir"], "tag": tag}


def run_merges(work: str, base: str, lora: dict) -> dict:
    ours_out, peft_out = os.path.join(work, "merged"), os.path.join(work, "peft-merged")
    for folder in (ours_out, ours_out + "-adapter", peft_out):
        shutil.rmtree(folder, ignore_errors=True)
    ours = measure([PY, "-m", "clusterctl.convert", "--checkpoint", lora["output_dir"], "--out", ours_out,
                    "--no-verify", "--base", base], env=ENV)
    script = os.path.join(work, "peft_merge.py")
    with open(script, "w") as f:
        f.write(PEFT_MERGE)
    theirs = measure([PY, script, base, os.path.join(lora["tag"], "adapter"), peft_out], env=ENV)
    for m, name in ((ours, "clusterctl convert"), (theirs, "peft merge")):
        if m.returncode:
            sys.exit(f"{name} failed:\n{m.output[-3000:]}")
    return {"ours": ours, "peft": theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large", action="store_true", help="also the ~400M model")
    p.add_argument("--work", help="work folder (default: a temporary one, removed at the end)")
    p.add_argument("--no-full", action="store_true", help="skip full SFT (its rows show '-'): LoRA and the "
                   "merges only, which fit a shared machine at 400M")
    a = p.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="bench-lora-")
    rows = []
    try:
        for size in ["100M"] + (["400M"] if a.large else []):
            folder = os.path.join(work, size)
            base = os.path.join(folder, "base")
            hidden = SIZES[size]["hidden_size"]
            build_tiny_model(base, shape={**SIZES[size], "intermediate_size": 2 * hidden, "n_routed_experts": 16,
                                          "moe_intermediate_size": hidden // 2, "n_group": 2})
            full = None if a.no_full else run_sft(folder, base, "full")
            lora = run_sft(folder, base, "lora")
            merges = run_merges(folder, base, lora)
            rows.append((size, full, lora, merges))
            shutil.rmtree(os.path.join(folder, "full"), ignore_errors=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'model':<6} {'what':<44} {'full / peft':>14} {'LoRA / ours':>14} {'ratio':>8}")
    for size, full, lora, merges in rows:
        ours, peft = merges["ours"], merges["peft"]
        for what, left, right in (
                ("SFT step time, s (2 ranks, ZeRO-3)", full and full["step_s"], lora["step_s"]),
                ("SFT peak anonymous memory, MiB (both ranks)", full and full["peak_anon"] / MiB,
                 lora["peak_anon"] / MiB),
                ("checkpoint size, MiB", full and full["checkpoint"] / MiB, lora["checkpoint"] / MiB),
                ("merge wall time, s", peft.wall_s, ours.wall_s),
                ("merge peak anonymous memory, MiB", peft.peak_anon / MiB, ours.peak_anon / MiB)):
            if left is None:
                print(f"{size:<6} {what:<44} {'-':>14} {right:>14.2f} {'-':>8}")
            else:
                print(f"{size:<6} {what:<44} {left:>14.2f} {right:>14.2f} {left / right:>7.1f}x")


if __name__ == "__main__":
    main()
