"""What the RL/preference kinds share on the nodes, around TRL's trainers: the model, TrainingArguments,
checkpoints in the layout the convert stage streams, resume, preemption and metrics.

Checkpoints are SFT's: `<output_dir>/step-N/` holds every rank's ZeRO shards (DeepSpeed tag step-N) beside
transformers' Trainer state (trainer_state.json, RNG state, scheduler.pt) and, written last after every
rank finished, `clusterctl-complete.json`; `<output_dir>/latest` names it. `clusterctl convert` streams
it like an SFT checkpoint, and no rank ever gathers the whole model to save it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError
from clusterctl.training import checkpoint as ckpt
from clusterctl.training.metrics import Metrics
from clusterctl.training.rl.config import RLConfig


def resume_point(output_dir: Path, world: int) -> str | None:
    """The newest complete checkpoint folder, checked to come from the same number of ranks."""
    tag = ckpt.latest_complete(output_dir)
    if tag is None:
        return None
    folder = Path(output_dir) / tag
    info = json.loads((folder / ckpt.MARKER).read_text())
    if info.get("world_size") != world:
        raise UserError(f"checkpoint {folder} was written by {info.get('world_size')} ranks, this run has "
                        f"{world}", where=str(folder),
                        fix="resume with the same nodes x GPUs per node, or start a new output_dir")
    return str(folder)


def load_zero_checkpoint(engine, checkpoint_path: str, load_module_strict: bool = True) -> None:
    """transformers' DeepSpeed resume for this layout, where the checkpoint folder is the tag folder itself
    (transformers looks for `<folder>/global_step*` and its own `latest`)."""
    folder = Path(checkpoint_path)
    load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=load_module_strict,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise UserError("DeepSpeed could not load this checkpoint", where=str(folder),
                        fix="remove its clusterctl-complete.json to resume from the one before")


class ZeroCheckpoints:
    """Mixin for a TRL trainer: saves the DeepSpeed shards + trainer state, then the marker (rank 0, after
    a barrier); replaces Trainer._save_checkpoint, whose save_model would gather a 16-bit model."""

    rl_config: RLConfig

    def _save_checkpoint(self: Any, model, trial) -> None:
        import torch
        import torch.distributed as dist

        step = self.state.global_step
        output_dir = Path(self.args.output_dir)
        tag = ckpt.tag_for(step)
        folder = output_dir / tag
        rank0 = self.args.process_index == 0
        if rank0:   # a marker left by an earlier run must not bless half-overwritten files
            (folder / ckpt.MARKER).unlink(missing_ok=True)
        dist.barrier()
        self.model_wrapped.save_checkpoint(str(output_dir), tag=tag, save_latest=False)
        self._save_rng_state(str(folder))
        if rank0:   # the Trainer's own scheduler (DeepSpeed saved its optimizer) and state
            torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
            self.state.save_to_json(str(folder / "trainer_state.json"))
        dist.barrier()
        if rank0:   # publish fsyncs every file of the folder before the marker
            ckpt.publish(output_dir, tag, {"step": step, "world_size": self.args.world_size,
                                           "zero_stage": self.rl_config.zero_stage, "kind": self.rl_config.kind,
                                           "format": "deepspeed"})
            ckpt.prune(output_dir, self.rl_config.save_total_limit)
        dist.barrier()


def metrics_callback(cfg: RLConfig, resume_step: int):
    """A TrainerCallback writing every logged step (loss, lr, grad norm, rewards per function, KL,
    completion lengths, ...) to metrics.jsonl and TensorBoard on rank 0, as SFT does."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self):
            self.metrics = None
            self.last = time.time()

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.metrics = RLMetrics(cfg.metrics_file, cfg.tensorboard_dir, resume_step=resume_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.metrics or not logs or "loss" not in logs:
                return
            now = time.time()
            values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"}
            values["lr"] = values.pop("learning_rate", float("nan"))
            values.setdefault("grad_norm", float("nan"))
            tokens = values.get("completions/mean_length")
            if tokens is not None:
                world_rows = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
                values["tokens_per_s"] = tokens * world_rows / max(now - self.last, 1e-9)
            values.setdefault("tokens_per_s", float("nan"))
            self.last = now
            self.metrics.log(step=state.global_step, max_steps=state.max_steps, **values)

        def on_train_end(self, args, state, control, **kwargs):
            if self.metrics:
                self.metrics.close()

    return MetricsCallback()


class RLMetrics(Metrics):
    """Metrics with every logged number (rewards, KL, margins) in TensorBoard, not only SFT's four."""

    def log(self, **values) -> dict:
        record = super().log(**values)
        if self.writer:
            for key, value in values.items():
                if key not in ("step", "max_steps", "loss", "lr", "grad_norm", "tokens_per_s"):
                    self.writer.add_scalar(f"train/{key}", value, values["step"])
            self.writer.flush()
        return record


def preemption_callback():
    """SIGUSR2 (Slurm's time-limit warning): ranks agree at the next step end, save and stop."""
    from transformers import TrainerCallback

    from clusterctl.training.sft import Preemption

    class PreemptionCallback(TrainerCallback):
        def __init__(self):
            self.signal = Preemption()
            self.preempted = False

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(self.signal.requested)])
            dist.all_reduce(flag)
            if flag.item() > 0:
                self.preempted = control.should_save = control.should_training_stop = True

    return PreemptionCallback()


def heartbeat_callback():
    """This rank's heartbeat for the node's watchdog (training/watchdog.py): at the start, after every step."""
    from transformers import TrainerCallback

    from clusterctl.training import watchdog

    class HeartbeatCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            watchdog.beat(state.global_step, "start")

        def on_step_end(self, args, state, control, **kwargs):
            watchdog.beat(state.global_step)

    return HeartbeatCallback()


def training_arguments(cfg: RLConfig) -> dict:
    """The TrainingArguments every kind shares (TRL's configs extend them)."""
    import torch

    return {
        "output_dir": cfg.output_dir, "per_device_train_batch_size": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum, "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps or -1, "learning_rate": cfg.lr, "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.grad_clip, "bf16": cfg.bf16,
        "use_cpu": not torch.cuda.is_available(), "deepspeed": cfg.ds_config(), "save_strategy": "steps",
        "save_steps": cfg.save_steps, "logging_steps": 1, "report_to": [], "seed": cfg.seed, "data_seed": cfg.seed,
        "gradient_checkpointing": cfg.gradient_checkpointing, "disable_tqdm": True, "dataloader_num_workers": 0}


def prepare_model(cfg: RLConfig) -> Path:
    """The base model folder (the built-in tiny one is built by rank 0) and `<output_dir>/hf/`, the
    architecture files convert needs. Runs before the TrainingArguments exist: once they do, ZeRO-3's
    zero.Init would partition any model built, and the tiny model's save would fail."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from clusterctl.training import deepspeed_ops
    from clusterctl.training.sft import resolve_model, save_layout

    deepspeed_ops.skip_unused_ops()       # no 60-80 s gcc build of an op training never calls
    # DeepSpeed's own communication layer must know the world (zero.Init sizes batches with it);
    # accelerate then reuses this process group.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if rank == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    base = resolve_model(cfg, rank)   # type: ignore[arg-type]  # reads .model and .output_dir only
    if rank == 0:
        save_layout(ckpt.write_hf_metadata(base, Path(cfg.output_dir)))
    dist.barrier()
    return base


def load_model(base: Path, cfg: RLConfig):
    """The policy, loaded after the TrainingArguments so ZeRO-3 partitions it while loading."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def train(trainer, cfg: RLConfig) -> int:
    """Run (resuming from the newest complete checkpoint); 75 when preempted, as SFT."""
    import torch.distributed as dist

    from clusterctl.training import watchdog
    from clusterctl.training.sft import PREEMPTED_EXIT_CODE, PREEMPTED_FILE

    trainer.rl_config = cfg
    output_dir = Path(cfg.output_dir)
    rank0 = trainer.args.process_index == 0
    if rank0:
        (output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    resume = resume_point(output_dir, trainer.args.world_size)
    step = (ckpt.step_of(Path(resume).name) or 0) if resume else 0
    import transformers.trainer

    transformers.trainer.deepspeed_load_checkpoint = load_zero_checkpoint   # see load_zero_checkpoint
    if resume and rank0:
        print(f"resuming from {resume} at step {step}", flush=True)
    preemption = preemption_callback()
    trainer.add_callback(preemption)
    trainer.add_callback(metrics_callback(cfg, step))
    trainer.add_callback(heartbeat_callback())
    with watchdog.noting_failures():
        trainer.train(resume_from_checkpoint=resume)
    watchdog.beat(trainer.state.global_step, watchdog.DONE)
    if preemption.preempted and rank0:
        atomic_write_text(output_dir / PREEMPTED_FILE,
                          json.dumps({"step": trainer.state.global_step, "time": time.time()}) + "\n")
    dist.barrier()
    return PREEMPTED_EXIT_CODE if preemption.preempted else 0


def node_config(argv: list[str] | None, prog: str) -> RLConfig:
    """What every RL kind's rank does first: parse --config, die with its launcher, quiet DeepSpeed's
    per-step deprecation warnings, load and check train.json."""
    import argparse
    import warnings

    from clusterctl.training.sft import die_with_launcher

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", required=True, help="train.json (RLConfig)")
    args = parser.parse_args(argv)
    die_with_launcher()
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = RLConfig.load(args.config)
    if not cfg.output_dir:
        raise UserError("output_dir is empty", where=f"{args.config}.output_dir", fix="set the checkpoint folder")
    return cfg


def run_main(build, argv: list[str] | None, prog: str) -> int:
    """Entry point shared by the TRL kinds: build the trainer, train; a UserError is one line."""
    try:
        cfg = node_config(argv, prog)
        trainer = build(cfg)
        try:
            return train(trainer, cfg)
        finally:
            for stop in getattr(trainer, "on_exit", ()):      # e.g. the rollout vLLM server
                stop()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
