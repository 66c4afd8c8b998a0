"""SFT step benchmark: clusterctl's trainer vs a minimal HF + DeepSpeed loop, same model, same DeepSpeed
config, same batches, same run; then the memory planner against the peak memory measured here.

    OMP_NUM_THREADS=1 python bench/sft/bench_sft.py [--steps 30] [--skip 5] [--repeat 2] [--work DIR]

Table 1, per ZeRO setup: tokens/s over steps skip+1..steps (best of --repeat) and peak RSS per rank (max
over ranks), ours / reference. Table 2: a larger model of the same family (about 100 M parameters): the
planner's per-rank model-dependent memory (no runtime term) vs the measured peak-RSS growth over the tiny
model (which removes the interpreter/library baseline both share).
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from clusterctl.plan import ModelShape, Setup, plan
from clusterctl.training.tiny import build_tiny_model

HERE = Path(__file__).resolve().parent
CASES = {"ZeRO-2": dict(zero_stage=2, offload_optimizer=False, offload_param=False),
         "ZeRO-3": dict(zero_stage=3, offload_optimizer=False, offload_param=False),
         "ZeRO-3 + offload": dict(zero_stage=3, offload_optimizer=True, offload_param=True)}
LARGER = dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, n_routed_experts=8, q_lora_rank=256,
              qk_nope_head_dim=64, v_head_dim=64)
NPROC = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, config: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(HERE / script), str(config), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def peak_rss(out: Path) -> float:
    return max(json.loads((out / f"rss-{r}.json").read_text())["peak_rss_mib"] for r in range(NPROC))


def run_one(work: Path, name: str, model: Path, case: dict, steps: int, who: str) -> Path:
    """One run of `who` (reference or ours) on the shared settings; returns its output folder."""
    out = work / "runs" / name / who
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = out / "train.json"
    config.write_text(json.dumps(dict(model=str(model), max_length=256, micro_batch=2, grad_accum=1, max_steps=steps,
                                      lr=1e-4, save_steps=10 ** 6, bf16=True, gradient_checkpointing=True, **case,
                                      output_dir=str(out / "checkpoints"), metrics_file=str(out / "metrics.jsonl"))))
    launch("reference_loop.py" if who == "reference" else "ours.py", config, out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)             # checkpoints of the larger model are big
    shutil.rmtree(out / "reference-checkpoint", ignore_errors=True)
    return out


def run_pair(work: Path, name: str, model: Path, case: dict, steps: int, skip: int, ours_first: bool) -> dict:
    """One reference run and one of ours on identical settings: tokens/s and peak RSS of each. Repeats
    alternate which runs first, so a load change on a shared machine does not always hit the same side."""
    order = ("ours", "reference") if ours_first else ("reference", "ours")
    outs = {who: run_one(work, name, model, case, steps, who) for who in order}
    ref_out, ours_out = outs["reference"], outs["ours"]
    ref = json.loads((ref_out / "reference.json").read_text())
    tokens = sum(ref["tokens"][skip:])
    ours = [json.loads(line) for line in (ours_out / "metrics.jsonl").read_text().splitlines()]
    return {"reference": {"rss": peak_rss(ref_out), "tps": tokens / (ref["ends"][steps] - ref["ends"][skip])},
            "ours": {"rss": peak_rss(ours_out), "tps": tokens / (ours[steps - 1]["elapsed"] - ours[skip - 1]["elapsed"])}}


def best(runs: list[dict]) -> dict:
    return {who: {"tps": max(r[who]["tps"] for r in runs), "rss": min(r[who]["rss"] for r in runs)}
            for who in ("ours", "reference")}


def planned_mib(shape: ModelShape, case: dict) -> float:
    setup = Setup(nodes=1, gpus_per_node=NPROC, zero=case["zero_stage"], offload_optimizer=case["offload_optimizer"],
                  offload_param=case["offload_param"], micro_batch=2, seq_len=256, runtime_gib=0,
                  host_runtime_gib=0, buffer_factor=1.0)
    p = plan(shape, setup)
    # CPU: GPU and host are one memory; every rank maps the whole (single-shard) checkpoint while loading
    return (sum(p.gpu.values()) + p.host["offloaded states"] / NPROC + p.host["loading"]) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s (warm-up)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--memory-only", action="store_true", help="only the planner-vs-measured table")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-sft-"))
    tiny = build_tiny_model(work / "tiny")
    larger = build_tiny_model(work / "larger", shape=LARGER)

    tiny_rss = {}
    if args.memory_only:
        tiny_rss = {name: peak_rss(run_one(work, "tiny", tiny, case, 4, "ours")) for name, case in CASES.items()}
    else:
        print(f"clusterctl SFT step vs minimal HF+DeepSpeed loop: tiny DeepSeek-V3, {NPROC} CPU ranks (gloo), bf16, "
              f"micro-batch 2, max_length 256, grad checkpointing, steps {args.skip + 1}..{args.steps}, "
              f"best of {args.repeat}")
        print(f"{'setup':<18} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6} {'ours RSS MiB':>13} "
              f"{'ref RSS MiB':>12} {'ratio':>6}")
        for name, case in CASES.items():
            r = best([run_pair(work, "tiny", tiny, case, args.steps, args.skip, ours_first=i % 2 == 1)
                      for i in range(args.repeat)])
            tiny_rss[name] = r["ours"]["rss"]
            print(f"{name:<18} {r['ours']['tps']:>11.0f} {r['reference']['tps']:>10.0f} "
                  f"{r['ours']['tps'] / r['reference']['tps']:>6.2f} {r['ours']['rss']:>13.0f} "
                  f"{r['reference']['rss']:>12.0f} {r['ours']['rss'] / r['reference']['rss']:>6.2f}")

    shape = ModelShape.from_config(json.loads((larger / "config.json").read_text()))
    small = ModelShape.from_config(json.loads((tiny / "config.json").read_text()))
    print(f"\nmemory planner vs measured, {shape.params() / 1e6:.1f} M-parameter model vs the tiny one "
          f"(per rank, model-dependent part)")
    print(f"{'setup':<18} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17}")
    for name, case in CASES.items():
        measured = peak_rss(run_one(work, "larger", larger, case, 4, "ours")) - tiny_rss[name]
        planned = planned_mib(shape, case) - planned_mib(small, case)
        print(f"{name:<18} {planned:>12.0f} {measured:>13.0f} {measured / planned:>17.2f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
