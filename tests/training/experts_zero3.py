"""One ZeRO-3 forward + backward of the tiny model on every rank (run under torchrun, 2 gloo ranks), in four
layouts: fused experts + full logits (today's reference), grouped experts, chunked loss, both.  Rank 0
writes each layout's loss and full gradients (per-expert rows, so the layouts compare) to OUT, and
the fused and grouped layouts' weights as SFT checkpoints to OUT's folder (fused/, grouped/), and how many
views of 3-D (routed-expert) ZeRO-3 parameters the forward's graph saved for the backward.

    python -m torch.distributed.run --nproc_per_node 2 experts_zero3.py MODEL OUT GROUPS
"""
import sys
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from clusterctl.training import checkpoint as ckpt
from clusterctl.training import experts, loss

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": False},
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_param": {"device": "cpu"}},
      "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}


def batch(rank: int):
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 600, (1, 45), generator=generator)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = loss.IGNORE
    labels[0, :6] = loss.IGNORE
    return ids, labels


def save(engine, model_dir: str, output_dir: Path, rank: int) -> None:
    """An SFT output_dir as the trainer leaves it (DeepSpeed checkpoint, hf/ metadata, marker): what convert reads."""
    engine.save_checkpoint(str(output_dir), tag="step-1", save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        ckpt.write_hf_metadata(Path(model_dir), output_dir)
        ckpt.publish(output_dir, "step-1", {"step": 1})


def step(model_dir: str, groups: int, chunked: bool, rank: int, output_dir: Path | None):
    keep = HfDeepSpeedConfig(DS)          # noqa: F841  (alive: from_pretrained partitions under zero.Init)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    largest = []
    if groups > 1:
        original = experts._group_elements
        experts._group_elements = lambda p, lo, hi: largest.append(hi - lo) or original(p, lo, hi)
        assert experts.regroup(model, groups, DS) == 2
        experts._group_elements = original
    model.train()
    head = loss.install(model, model.config.vocab_size, budget=7 * model.config.vocab_size * loss.BYTES_PER_LOGIT)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=DS)
    if output_dir:
        save(engine, model_dir, output_dir, rank)
    ids, labels = batch(rank)
    held = []          # 3-D ZeRO-3 parameters the graph keeps a view of (their gathered storage stays alive)

    def pack(saved):
        base = saved._base
        if base is not None and hasattr(base, "ds_id") and base.dim() == 3:
            held.append(tuple(base.shape))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        if chunked:
            with head.loss_for(labels):
                value = engine(input_ids=ids).logits
        else:
            logits = engine(input_ids=ids).logits
            value = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=loss.IGNORE,
                                    reduction="sum")
    engine.backward(value)
    grads = {}
    for name, param in engine.module.named_parameters():
        grad = deepspeed.utils.safe_get_full_grad(param)
        grads[name.replace(".groups.", ".group")] = None if grad is None else grad.detach().clone()
    summed = value.detach().clone()
    torch.distributed.all_reduce(summed)
    engine.destroy()
    return summed, grads, max(largest, default=0), len(held)


def main(model_dir: str, out: str, groups: int) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results = {name: step(model_dir, g, chunked, rank, Path(out).parent / name if not chunked else None)
               for name, g, chunked in (("fused", 1, False), ("grouped", groups, False),
                                        ("chunked", 1, True), ("grouped+chunked", groups, True))}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
