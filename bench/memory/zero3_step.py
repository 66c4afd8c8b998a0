"""One rank of bench_memory.py's ZeRO-3 case (run under torchrun): load MODEL partitioned (bf16, zero.Init),
split the routed experts in GROUPS (1: today's fused path), chunked loss, gradient checkpointing, then a
warm-up step and a measured forward + backward of TOKENS tokens.  Prints one JSON line per rank: the peak
RSS growth of the measured forward + backward over the RSS before it, and of loading and of regrouping.

    python -m torch.distributed.run --nproc_per_node 2 zero3_step.py MODEL GROUPS TOKENS KNOB
"""
import gc
import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from clusterctl.training import experts, loss


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:      # 5: reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def main(model_dir: str, groups: int, tokens: int, knob: float) -> None:
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "stage3_prefetch_bucket_size": knob, "reduce_bucket_size": knob,
                                "stage3_max_live_parameters": knob, "stage3_max_reuse_distance": knob}}
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    reset_peak()
    before_load = status("VmRSS:")
    keep = HfDeepSpeedConfig(ds)          # noqa: F841  (alive: from_pretrained partitions under zero.Init)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    gc.collect()
    load_peak = status("VmHWM:") - before_load
    reset_peak()
    before_regroup = status("VmRSS:")
    experts.regroup(model, groups, ds)
    regroup_peak = status("VmHWM:") - before_regroup
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head = loss.install(model, model.config.vocab_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(rank))
    labels = ids.roll(-1, dims=1)
    growth = []
    for _ in range(2):                    # the first step allocates DeepSpeed's buffers; the second is measured
        gc.collect()
        reset_peak()
        base = status("VmRSS:")
        with head.loss_for(labels):
            value = engine(input_ids=ids).logits
        engine.backward(value)
        growth.append(status("VmHWM:") - base)
        engine.step()
    print(json.dumps({"rank": rank, "step_peak_growth": growth[-1], "load_peak_growth": load_peak,
                      "regroup_peak_growth": regroup_peak,
                      "loss": value.item()}), flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
