"""The reference for bench_sft.py: a minimal HF + DeepSpeed training loop (what one writes by hand),
same model, same DeepSpeed config, same batches in the same order. Run under torchrun:
    torchrun --nproc_per_node 2 reference_loop.py train.json OUT_DIR
Rank 0 writes OUT_DIR/reference.json (per-step end times and global tokens); every rank OUT_DIR/rss-R.json."""
import json
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from peak_rss import write_peak_rss
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from clusterctl.training.batching import collate, sample_lengths, stream
from clusterctl.training.config import TrainConfig
from clusterctl.training.data import IGNORE, load_dataset
from clusterctl.training.sft import build_optimizer, exit_now, runtime_ds_config


def main() -> None:
    cfg, out = TrainConfig.load(sys.argv[1]), Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = runtime_ds_config(cfg, on_gpu=False)
    keep = HfDeepSpeedConfig(ds) if cfg.zero_stage == 3 else None          # noqa: F841 (zero.Init while loading)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model.parameters()), config=ds)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    samples = load_dataset(cfg.data, tokenizer, cfg.max_length)
    batches = stream(sample_lengths(samples), seed=cfg.seed, rows_per_step=world * cfg.micro_batch, max_length=cfg.max_length,
                     packing=cfg.packing)
    ends, tokens = [time.time()], []
    for _ in range(cfg.max_steps):
        step_tokens = torch.zeros(1)
        for _ in range(cfg.grad_accum):
            _, rows = next(batches)
            batch = collate(samples, rows[rank * cfg.micro_batch:(rank + 1) * cfg.micro_batch],
                            pad_id=tokenizer.eos_token_id, multiple=1)
            labels = torch.cat([torch.full((batch.labels.shape[0], 1), IGNORE), batch.labels[:, :-1]], 1)
            lengths = torch.tensor([sum(len(samples[i].input_ids) for i in row) for row in
                                    rows[rank * cfg.micro_batch:(rank + 1) * cfg.micro_batch]])
            mask = (torch.arange(batch.input_ids.shape[1])[None, :] < lengths[:, None]).long()
            loss = engine(input_ids=batch.input_ids, attention_mask=mask, labels=labels).loss
            engine.backward(loss)
            engine.step()
            step_tokens += batch.tokens
        dist.all_reduce(step_tokens)
        ends.append(time.time())
        tokens.append(int(step_tokens.item()))
        if rank == 0:
            print(f"reference step {len(tokens)} loss {loss.item():.4f}", flush=True)
    engine.save_checkpoint(str(out / "reference-checkpoint"), tag="final")
    if rank == 0:
        (out / "reference.json").write_text(json.dumps({"ends": ends, "tokens": tokens}))
    write_peak_rss(out, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)
