"""Peak memory before/after issue 13, each beside the planner's prediction, in one table:

- a ZeRO-3 forward + backward on 2 CPU ranks (gloo, bf16, gradient checkpointing, chunked loss) of a
  DeepSeek-V3-architecture model with 64 routed experts, the experts fused as transformers holds them
  ("before") and split in groups by training/experts.py ("after"); measured: the peak RSS growth of the
  step over the RSS before it (the larger rank), predicted: the planner's per-step terms (gathered params,
  module grad, buckets, activations, logits+loss) with the bench's DeepSpeed bucket/live settings; and
  the peak growth while regrouping (one group assembled at a time, never the fused layer);
- the loss step with the 129,280 vocabulary (bench_loss_memory.py): full logits ("before") and chunked.

    python bench/memory/bench_memory.py [--groups 8] [--tokens 512] [--knob 2e7] [--loss-tokens 4096,8192]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
MIB = 2**20
SHAPE = dict(hidden_size=1024, intermediate_size=1024, moe_intermediate_size=512, n_routed_experts=64,
             num_experts_per_tok=6, num_attention_heads=8, num_key_value_heads=8)
# glibc keeps freed blocks of a few MiB in its heap, so RSS would count memory that is free again (zero.Init
# frees each full tensor once partitioned): blocks over 64 KiB are mapped and returned to the system at once.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}
STEP_TERMS = ("gathered params", "module grad", "buckets", "activations", "logits+loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_step(model: Path, groups: int, tokens: int, knob: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(HERE / "zero3_step.py"), str(model), str(groups), str(tokens),
               str(knob)]
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **ALLOCATOR})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
    return {key: max(r[key] for r in ranks) for key in ("step_peak_growth", "regroup_peak_growth", "loss")}


def predicted(model: Path, groups: int, tokens: int, knob: float) -> float:
    from clusterctl.plan import Setup, load_shape, plan

    setup = Setup(nodes=1, gpus_per_node=2, zero=3, micro_batch=1, seq_len=tokens, prefetch_bucket=knob,
                  reduce_bucket=knob, max_live_parameters=knob, expert_groups=groups, runtime_gib=0)
    return sum(plan(load_shape(str(model)), setup).gpu[t] for t in STEP_TERMS)


def main() -> None:
    from bench_loss_memory import measure

    from clusterctl.training.loss import BYTES_PER_LOGIT, chunk_tokens
    from clusterctl.training.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--knob", type=float, default=2e7, help="DeepSpeed prefetch/reduce bucket, max live params")
    parser.add_argument("--loss-tokens", default="4096,8192")
    parser.add_argument("--vocab", type=int, default=129_280)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "moe64", shape=SHAPE)
        layer = 64 * 3 * SHAPE["hidden_size"] * SHAPE["moe_intermediate_size"]
        for label, groups in (("before: fused", 1), (f"after: {args.groups} groups", args.groups)):
            got = zero3_step(model, groups, args.tokens, args.knob)
            rows.append((f"ZeRO-3 step, 64 experts ({layer / 1e6:.0f} M/layer), {args.tokens} tokens", label,
                         got["step_peak_growth"], predicted(model, groups, args.tokens, args.knob),
                         f"loss {got['loss']:.1f}; regroup peak {got['regroup_peak_growth'] / MIB:.0f} MiB"))
    for tokens in [int(t) for t in args.loss_tokens.split(",")]:
        for mode in ("full", "chunked"):
            got = measure(mode, tokens, args.vocab, 1024)
            logit_tokens = tokens if mode == "full" else min(tokens, chunk_tokens(args.vocab))
            expected = logit_tokens * args.vocab * BYTES_PER_LOGIT + 2 * (args.vocab + tokens) * 1024
            rows.append((f"loss, {tokens} tokens x {args.vocab} vocab", "before: full" if mode == "full" else
                         "after: chunked", got["peak_growth"], expected, f"loss {got['loss']:.1f}"))
    print("| case | layout | measured peak growth MiB | planner MiB | measured / planner | note |")
    print("|---|---|---:|---:|---:|---|")
    for case, label, measured, plan_bytes, note in rows:
        print(f"| {case} | {label} | {measured / MIB:.0f} | {plan_bytes / MIB:.0f} | {measured / plan_bytes:.2f} | {note} |")


if __name__ == "__main__":
    main()
