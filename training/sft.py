"""Full-parameter SFT on the nodes: transformers + DeepSpeed ZeRO-2/3 (+offload) + Ulysses SP.

    torchrun --nnodes N --node_rank R --nproc_per_node G --master_addr A --master_port P \\
        -m clusterctl.training.sft --config train.json

train.json is `TrainConfig` (training/config.py). The run resumes by itself from the newest complete
checkpoint in output_dir (same step, same data order). Checkpoints are `<output_dir>/step-N/` (DeepSpeed
layout) + `clusterctl-complete.json`, written after every rank finished; `<output_dir>/latest` follows.

Preemption: on SIGUSR2 (Slurm `--signal=USR2@SECONDS`) every rank finishes the current optimizer
step, a checkpoint is saved, `<output_dir>/preempted.json` is written and the process exits with
PREEMPTED_EXIT_CODE (75, EX_TEMPFAIL): "stopped cleanly, requeue me". torchrun itself reports any
non-zero child as 1, so the Slurm batch script reads preempted.json (what it logs on requeue), not the exit code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError
from clusterctl.training import checkpoint as ckpt
from clusterctl.training import deepspeed_ops, evaluation, watchdog
from clusterctl.training.config import BUILTIN_TINY_MODEL, TrainConfig
from clusterctl.training.loss import install as install_chunked_loss

PREEMPTED_EXIT_CODE = 75
PREEMPTED_FILE = "preempted.json"
WARMUP_START = 1e-5             # warmup starts at this fraction of lr (the reference recipe's)


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup from WARMUP_START to 1, then cosine down to min_ratio, as a multiple of lr."""
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Preemption:
    """Remembers a SIGUSR2; ranks agree on it at the next optimizer-step boundary."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGUSR2, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        print("SIGUSR2: saving a checkpoint at the end of this step, then exiting "
              f"with {PREEMPTED_EXIT_CODE}", flush=True)


def resolve_model(cfg: TrainConfig, rank: int) -> Path:
    """The base model folder; the built-in tiny model is built once by global rank 0."""
    import torch.distributed as dist

    if cfg.model == BUILTIN_TINY_MODEL:
        base = Path(cfg.output_dir).resolve().parent / "base-model"
        if rank == 0:
            from clusterctl.training.tiny import build_tiny_model
            build_tiny_model(base)
        dist.barrier()
        return base
    base = Path(cfg.model)
    if not (base / "config.json").is_file():
        raise UserError(f"{base} is not a Hugging Face model folder (no config.json)", where="train.json.model",
                        fix=f"give a model folder, or {BUILTIN_TINY_MODEL!r} for the built-in tiny model")
    quant = json.loads((base / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        raise UserError("the model holds FP8 weights (DeepSeek's release format); full-parameter SFT needs BF16",
                        where=str(base / "config.json"), fix=f"run `clusterctl fp8-to-bf16 {base} OUT` and train OUT")
    return base


def save_layout(hf_dir: Path) -> None:
    """The converter's name map, made now while transformers is loaded, so `clusterctl convert` need not
    import it.  An architecture the streaming converter cannot map only loses the shortcut: convert then
    explains what is wrong."""
    from clusterctl.convert.layout import write_layout

    try:
        write_layout(str(hf_dir))
    except UserError as exc:
        print(f"[sft] note: no conversion map saved: {exc}", file=sys.stderr, flush=True)


def runtime_ds_config(cfg: TrainConfig, on_gpu: bool) -> dict:
    """cfg.ds_config() with what only the node knows: pinned host memory needs a GPU."""
    ds = cfg.ds_config()
    if not on_gpu:
        for key in ("offload_optimizer", "offload_param"):
            if key in ds["zero_optimization"]:
                ds["zero_optimization"][key]["pin_memory"] = False
    return ds


def build_optimizer(cfg: TrainConfig, params):
    """torch AdamW (no JIT build), or DeepSpeed's CPU Adam when the optimizer lives in host memory."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        deepspeed_ops.announce_build("cpu_adam")
        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    import torch
    return torch.optim.AdamW(params, **kwargs)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed
        import torch
        import torch.distributed as dist

        self.cfg = cfg
        on_gpu = torch.cuda.is_available()
        deepspeed_ops.skip_unused_ops()
        # A collective that never returns fails the rank after collective_timeout_s, naming the operation.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                   timeout=timedelta(seconds=cfg.collective_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        sp = cfg.sequence_parallel
        if self.world % sp:
            raise UserError(f"sequence_parallel {sp} does not divide the {self.world} ranks",
                            where="train.json.sequence_parallel", fix="use a divisor of nodes x GPUs per node")
        self.sp, self.sp_rank, self.dp_rank, self.dp_size = sp, self.rank % sp, self.rank // sp, self.world // sp
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.manual_seed(cfg.seed)
        self.output_dir = Path(cfg.output_dir)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        self.base = resolve_model(cfg, self.rank)
        self._load_data()
        if self.rank == 0:    # before the engine: under ZeRO-3 even a meta model would be built in zero.Init
            save_layout(ckpt.write_hf_metadata(self.base, self.output_dir))
        self._build_engine(runtime_ds_config(cfg, on_gpu))

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        from clusterctl.training.batching import epoch_steps, sample_lengths
        from clusterctl.training.data import load_dataset
        from clusterctl.training.datacache import training_samples

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.samples = training_samples(cfg.data, self.tokenizer, cfg.max_length, cfg.output_dir, self.rank,
                                         cfg.data_cache_dir)
        self.samples, self.eval_samples = evaluation.split(
            self.samples, cfg, lambda path: load_dataset(path, self.tokenizer, cfg.max_length))
        if evaluation.evaluates(cfg) and not self.eval_samples:
            raise UserError(f"no conversation left to evaluate on ({len(self.samples)} in the data set)",
                            where="train.json.eval_ratio", fix="add data, or give an eval file (eval_data)")
        self.rows_per_step = self.dp_size * cfg.micro_batch
        self.batching = dict(seed=cfg.seed, rows_per_step=self.rows_per_step, max_length=cfg.max_length,
                             packing=cfg.packing)
        self.lengths = sample_lengths(self.samples)
        per_epoch = len(epoch_steps(self.lengths, epoch=0, **self.batching))
        if per_epoch == 0:
            raise UserError(f"{len(self.samples)} conversations do not fill one micro-step of "
                            f"{self.rows_per_step} rows (micro_batch x data-parallel ranks)",
                            where="train.json.data", fix="add data or lower micro_batch")
        self.max_steps = cfg.max_steps or max(1, int(cfg.epochs * per_epoch / cfg.grad_accum))

    def _build_engine(self, ds_config: dict) -> None:
        import deepspeed
        import torch
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from clusterctl.training.lora import load_options

        cfg = self.cfg
        self.sp_group, attention = None, "sdpa"
        heads = json.loads((self.base / "config.json").read_text()).get("num_attention_heads", 0)
        if self.sp > 1 and heads % self.sp:
            raise UserError(f"sequence_parallel {self.sp} does not divide the model's {heads} attention heads",
                            where="train.json.sequence_parallel", fix="Ulysses splits the heads: use a divisor")
        if self.sp > 1:
            from clusterctl.training import ulysses
            self.sp_group = ulysses.new_groups(self.world, self.sp)
            attention = ulysses.register(self.sp_group)
        # ZeRO-3: this object must be alive during from_pretrained so weights load partitioned (zero.Init).
        self._hf_ds = HfDeepSpeedConfig(ds_config) if cfg.zero_stage == 3 else None
        model = AutoModelForCausalLM.from_pretrained(
            self.base, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, attn_implementation=attention,
            **load_options(cfg))
        model.config.use_cache = False
        self._regroup_experts(model, ds_config)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.loss_head = install_chunked_loss(model, model.config.vocab_size)
        if cfg.method != "full":
            from clusterctl.training.lora import attach
            model = attach(model, cfg, self.output_dir, self.rank)
        warmup = math.ceil(cfg.warmup_ratio * self.max_steps)
        schedule = partial(lr_factor, total=self.max_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]),
            lr_scheduler=lambda optimizer: LambdaLR(optimizer, schedule), config=ds_config)

    def _regroup_experts(self, model, ds_config: dict) -> None:
        """Routed experts in bounded groups, so ZeRO-3 never gathers a whole layer's (training/experts.py)."""
        from clusterctl.training import experts

        groups = experts.groups_for(model.config, self.cfg.expert_groups)
        if experts.regroup(model, groups, ds_config) and self.rank == 0:
            print(f"[sft] routed experts gathered in {groups} groups per MoE layer", flush=True)

    def _resume(self) -> int:
        import torch.distributed as dist

        found = [ckpt.latest_complete(self.output_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)
        tag = found[0]
        if tag is None:
            return 0
        info = json.loads((self.output_dir / tag / ckpt.MARKER).read_text())
        if info.get("world_size") != self.world:
            raise UserError(f"checkpoint {tag} was written by {info.get('world_size')} ranks, this run has "
                            f"{self.world}", where=str(self.output_dir / tag),
                            fix="resume with the same nodes x GPUs per node, or start a new output_dir")
        _, client = self.engine.load_checkpoint(str(self.output_dir), tag=tag,   # adapter-only under LoRA
                                                load_module_strict=self.cfg.method == "full")
        # The restored lr is the old schedule's; recompute it so a changed max_steps/lr applies at once.
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [self.cfg.lr] * len(scheduler.base_lrs)
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        print(f"rank {self.rank}: resumed from {self.output_dir / tag} at step {client['step']}", flush=True)
        return client["step"]

    def _save(self, step: int) -> None:
        import torch.distributed as dist

        tag = ckpt.tag_for(step)
        if self.rank == 0:  # a marker left by an earlier run must not bless half-overwritten files
            (self.output_dir / tag / ckpt.MARKER).unlink(missing_ok=True)
        dist.barrier()
        lora = self.cfg.method != "full"
        self.engine.save_checkpoint(str(self.output_dir), tag=tag, client_state={"step": step},
                                    save_latest=False, exclude_frozen_parameters=lora)
        if lora:
            from clusterctl.training.lora import save_adapter
            save_adapter(self.engine.module, self.output_dir / tag / "adapter", self.rank)
        dist.barrier()
        if self.rank == 0:
            ckpt.publish(self.output_dir, tag, {"step": step, "eval_loss": self.last_eval_loss, "world_size": self.world,
                                                "zero_stage": self.cfg.zero_stage,
                                                "sequence_parallel": self.sp, "format": "deepspeed",
                                                "method": self.cfg.method})
            ckpt.prune(self.output_dir, self.cfg.save_total_limit,
                       protect=evaluation.best_tag(self.output_dir) if self.cfg.select == "best" else None)
        dist.barrier()

    def _micro_step(self, rows) -> tuple:
        """Forward + backward of this rank's rows; returns (token-loss sum, label count, real tokens)."""
        from clusterctl.training import ulysses
        from clusterctl.training.batching import collate
        from clusterctl.training.data import IGNORE

        mine = rows[self.dp_rank * self.cfg.micro_batch:(self.dp_rank + 1) * self.cfg.micro_batch]
        pad = self.tokenizer.pad_token_id
        batch = collate(self.samples, mine, pad_id=self.tokenizer.eos_token_id if pad is None else pad,
                        multiple=self.sp)
        tensors = [batch.input_ids, batch.position_ids, batch.labels]
        if self.sp > 1:
            tensors = [ulysses.shard(t, self.sp_rank, self.sp) for t in tensors]
        ids, pos, labels = (t.to(self.engine.device) for t in tensors)
        with self.loss_head.loss_for(labels):      # chunked: never the full [tokens x vocab] logits (loss.py)
            loss_sum = self.engine(input_ids=ids, position_ids=pos).logits
        count = (labels != IGNORE).sum()
        self.engine.backward(loss_sum * ulysses.loss_scale(count, self.sp_group, self.sp))
        self.engine.step()
        tokens = batch.tokens if self.sp_rank == 0 else 0
        return loss_sum.detach().float(), count.float(), float(tokens)

    def run(self) -> int:
        import torch
        import torch.distributed as dist

        from clusterctl.training.batching import stream
        from clusterctl.training.metrics import Metrics
        from clusterctl.training.tracking import open_trackers

        cfg = self.cfg
        preemption = Preemption()
        step = self._resume()
        watchdog.beat(step, "start")      # the node's watchdog starts its clock here (after model load)
        tensorboard = cfg.tensorboard_dir if "tensorboard" in cfg.report_to else ""
        metrics = Metrics(cfg.metrics_file, tensorboard, resume_step=step) if self.rank == 0 else None
        trackers = open_trackers(cfg) if self.rank == 0 else None
        self.last_eval_loss = None
        if step == 0 and evaluation.evaluates(cfg):      # the baseline a deploy gate can compare with
            self.last_eval_loss = evaluation.eval_loss(self)
            if metrics:
                trackers.log(metrics.log_eval(step=0, max_steps=self.max_steps, eval_loss=self.last_eval_loss))
        micro_steps = stream(self.lengths, skip=step * cfg.grad_accum, **self.batching)
        preempted = False
        while step < self.max_steps and not preempted:
            started = time.time()
            lr = self.engine.get_lr()[0]
            stats = torch.zeros(4)
            for _ in range(cfg.grad_accum):
                _, rows = next(micro_steps)
                loss_sum, count, tokens = self._micro_step(rows)
                stats += torch.tensor([loss_sum.item(), count.item(), tokens, 0.0])
            stats[3] = float(preemption.requested)
            dist.all_reduce(stats)
            step += 1
            watchdog.beat(step)
            preempted = bool(stats[3] > 0)
            tokens_per_s = stats[2].item() / (time.time() - started)
            evaluated = evaluation.due(cfg, step, self.max_steps)
            self.last_eval_loss = evaluation.eval_loss(self) if evaluated else None   # the checkpoint's
            if metrics:
                grad_norm = self.engine.get_global_grad_norm()
                record = metrics.log(step=step, max_steps=self.max_steps,
                                     loss=(stats[0] / stats[1].clamp(min=1)).item(), lr=lr,
                                     grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                                     tokens_per_s=tokens_per_s,
                                     **({"eval_loss": self.last_eval_loss} if evaluated else {}))
                trackers.log(record)
            if step % cfg.save_steps == 0 or step == self.max_steps or preempted:
                self._save(step)
        if metrics:
            metrics.close()
            trackers.close()
        if self.rank == 0 and cfg.select == "best" and step == self.max_steps:
            print(f"select: best: convert takes {evaluation.point_latest_at_best(self.output_dir)}", flush=True)
        if preempted and self.rank == 0:
            atomic_write_text(self.output_dir / PREEMPTED_FILE,
                              json.dumps({"step": step, "tag": ckpt.tag_for(step), "time": time.time()}) + "\n")
        dist.barrier()
        dist.destroy_process_group()
        return PREEMPTED_EXIT_CODE if preempted else 0


def die_with_launcher() -> None:
    """torchrun starts every rank in a session of its own, so killing the node script's process group
    would leave the ranks running as orphans: have the kernel kill this rank when its launcher dies."""
    if sys.platform != "linux" or "LOCAL_RANK" not in os.environ:
        return
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:                                            # the launcher died before prctl
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="train.json (TrainConfig)")
    args = parser.parse_args(argv)
    die_with_launcher()
    # DeepSpeed calls torch's old collective names every step; one warning per call floods the node logs.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    cfg = TrainConfig.load(args.config)
    if not cfg.output_dir:
        raise UserError("output_dir is empty", where=f"{args.config}.output_dir", fix="set the checkpoint folder")
    try:
        with watchdog.noting_failures():
            code = Trainer(cfg).run()
        watchdog.beat(watchdog.last_step(), watchdog.DONE)
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def exit_now(code: int) -> None:
    """Leave without interpreter teardown: after a finished run, gloo/DeepSpeed threads sometimes abort
    the process there ("terminate called without an active exception", RECIPES §4.2), turning a
    complete run into a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
