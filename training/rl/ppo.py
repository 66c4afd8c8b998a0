"""PPO on the nodes (trl 1.16 no longer ships a PPOTrainer): DeepSpeed engines for the actor (the policy)
and the critic (a value head on a copy of the actor's backbone, or on `ppo.value_model`'s), a frozen
reference copy of the initial actor for the per-token KL penalty, and a reward: a sequence-classification
model folder (`ppo.reward_model`) or the user's reward functions (grpo's loader and checks).

    torchrun ... -m clusterctl.training.rl.ppo --config ppo/train.json

One step: every rank samples `num_generations` completions for each of its `micro_batch` prompts
(transformers `generate`, ZeRO-3 ranks in step), scores them, computes per-token rewards, GAE advantages
and returns (training/rl/ppo_math.py), then runs `ppo_epochs` passes of `num_mini_batches` optimizer
steps of the clipped policy and value losses.

Checkpoints are SFT's layout: `<output_dir>/step-N/` holds the actor's ZeRO shards (what `clusterctl
convert` streams) and `critic/` (the critic's, for resume only), then the marker; `latest` names it.
SIGUSR2: save, preempted.json, exit 75, as the other kinds.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError
from clusterctl.training import checkpoint as ckpt
from clusterctl.training.rl.config import RLConfig


def engine_config(cfg: RLConfig, rows: int, world: int, *, train: bool) -> dict:
    """DeepSpeed's config for one engine: the job's ZeRO settings with the batch filled in (a mini-batch of
    `rows` completions per rank is one optimizer step). A frozen model under ZeRO-3 keeps only the
    partitioning."""
    import torch

    from clusterctl.training.sft import runtime_ds_config

    ds = runtime_ds_config(cfg, torch.cuda.is_available())  # type: ignore[arg-type]  # reads ds_config only
    ds.update(train_micro_batch_size_per_gpu=rows, gradient_accumulation_steps=1, train_batch_size=rows * world,
              gradient_clipping=cfg.grad_clip, bf16={"enabled": cfg.bf16})
    if not train:
        ds["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 1e4}
        ds.pop("gradient_clipping")
    return ds


def prompt_rows(path: str) -> list[dict]:
    """The prompt data set (checked line by line at submit), one dict per line."""
    from clusterctl.training.rl.data import read_rows, resolve_data

    rows = [row for _, row, error in read_rows(Path(resolve_data(path))) if not error and isinstance(row, dict)]
    if not rows:
        raise UserError("no prompts in the data set", where=path, fix="one JSON object per line with a prompt")
    return rows


class Critic:
    """Built lazily (torch): the value model is a backbone plus a linear value head, one value per token."""

    @staticmethod
    def build(folder: Path, dtype):
        import torch
        from transformers import AutoModel

        class ValueModel(torch.nn.Module):
            def __init__(self, backbone):
                super().__init__()
                self.backbone = backbone
                self.v_head = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=dtype)
                torch.nn.init.zeros_(self.v_head.weight)
                torch.nn.init.zeros_(self.v_head.bias)

            def forward(self, **inputs):
                hidden = self.backbone(**inputs).last_hidden_state
                return self.v_head(hidden).squeeze(-1).float()

            def gradient_checkpointing_enable(self, **kwargs):
                self.backbone.gradient_checkpointing_enable(**kwargs)

        backbone = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        backbone.config.use_cache = False
        return ValueModel(backbone)


class PPOTrainer:
    def __init__(self, cfg: RLConfig):
        import torch
        import torch.distributed as dist
        from transformers import AutoTokenizer

        from clusterctl.training.rl import runner
        from clusterctl.training.rl.ppo_math import KLController

        self.cfg, self.p = cfg, cfg.ppo
        self.output_dir = Path(cfg.output_dir)
        self.base = runner.prepare_model(cfg)       # init_distributed, the tiny model, hf/ for convert
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.rows = prompt_rows(cfg.data)
        per_step = cfg.micro_batch * self.world
        if len(self.rows) < per_step:
            raise UserError(f"{len(self.rows)} prompts do not fill one step of {per_step} (micro_batch x ranks)",
                            where="train.json.data", fix="add prompts or lower micro_batch")
        self.max_steps = cfg.max_steps or max(1, int(cfg.epochs * len(self.rows) // per_step))
        self.batch = cfg.micro_batch * self.p.num_generations       # completions per rank per step
        self.mini = self.batch // self.p.num_mini_batches
        self.kl = KLController(self.p.kl_coef, target=self.p.target_kl, horizon=self.p.kl_horizon)
        self.rewards = self._reward_functions()
        self.dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        self._build_engines()

    def _reward_functions(self) -> list:
        from clusterctl.training.rl.rewards import load_guarded

        return load_guarded(self.p.rewards) if self.p.rewards else []

    def _build_engines(self) -> None:
        import deepspeed
        import torch
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from transformers.integrations import HfDeepSpeedConfig

        cfg = self.cfg
        train_ds = engine_config(cfg, self.mini, self.world, train=True)
        frozen_ds = engine_config(cfg, self.batch, self.world, train=False)
        # ZeRO-3: alive during from_pretrained, so every model loads partitioned (zero.Init).
        self._hf_ds = HfDeepSpeedConfig(train_ds) if cfg.zero_stage == 3 else None

        def causal_lm():
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=self.dtype, attn_implementation="sdpa")
            model.config.use_cache = False
            return model

        def trained(model):
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            params = [p for p in model.parameters() if p.requires_grad]
            if cfg.offload_optimizer:       # the optimizer in host memory: DeepSpeed's CPU Adam, as SFT's
                from deepspeed.ops.adam import DeepSpeedCPUAdam
                optimizer = DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
            else:
                optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=train_ds,
                                              lr_scheduler=lambda opt: LambdaLR(opt, self._warmup))
            return engine

        def frozen(model):
            model.requires_grad_(False)
            if cfg.zero_stage == 3:    # the engine partitions it and gathers layers as they run
                model = deepspeed.initialize(model=model, config=frozen_ds)[0]
            model.eval()
            return model

        self.actor = trained(causal_lm())
        self.critic = trained(Critic.build(Path(self.p.value_model or self.base), self.dtype))
        self.reference = frozen(causal_lm())
        self.reward_model = None
        if self.p.reward_model:
            self.reward_model = frozen(AutoModelForSequenceClassification.from_pretrained(
                self.p.reward_model, dtype=self.dtype, num_labels=1))
        torch.manual_seed(cfg.seed)

    def _warmup(self, update: int) -> float:
        """The lr factor: linear warmup over warmup_ratio of the run's optimizer steps, then constant."""
        updates = self.max_steps * self.p.ppo_epochs * self.p.num_mini_batches
        warmup = int(self.cfg.warmup_ratio * updates)
        return min(1.0, (update + 1) / warmup) if warmup else 1.0

    # ---- rollout -------------------------------------------------------------------------------------

    def _prompts(self, step: int) -> list[dict]:
        """This rank's prompts of a step: a seeded shuffle per epoch, so a resumed run takes the same ones."""
        import torch

        per_step = self.cfg.micro_batch * self.world
        steps_per_epoch = len(self.rows) // per_step
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        start = within * per_step + self.rank * self.cfg.micro_batch
        return [self.rows[i] for i in order[start:start + self.cfg.micro_batch].tolist()]

    def _encode(self, prompt) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, list):
            ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        else:
            ids = tok(prompt)["input_ids"]
        return list(ids)[-self.cfg.max_length:]

    def _rollout(self, rows: list[dict]) -> dict:
        """Sample completions; the log-probs of actor and reference, the critic's values, the scores."""
        import torch

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        repeated = [row for row in rows for _ in range(self.p.num_generations)]
        encoded = [self._encode(row["prompt"]) for row in repeated]
        width = max(map(len, encoded))
        prompt_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        prompt_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        module = self.actor.module
        module.eval()
        with torch.no_grad():
            out = module.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                  temperature=self.p.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=self.p.max_completion_length, pad_token_id=pad,
                                  eos_token_id=tok.eos_token_id, use_cache=True, synced_gpus=self.world > 1)
        module.train()
        completion = out[:, width:]
        is_eos = completion == tok.eos_token_id
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0       # tokens after the first EOS
        mask = (~after_eos).float()
        batch = {"input_ids": torch.cat([prompt_ids, completion], dim=1),
                 "attention_mask": torch.cat([prompt_mask, mask.long()], dim=1)}
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logprobs = self._logprobs(module, batch, width)
            ref_logprobs = self._logprobs(self.reference, batch, width)
            values = self.critic(**batch)[:, width - 1:-1]
            scores, per_function = self._scores(repeated, completion, mask, batch)
        return {"batch": batch, "width": width, "mask": mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
                "values": values, "scores": scores, "per_function": per_function}

    def _logprobs(self, model, batch: dict, width: int):
        """Log-probabilities of the completion tokens under `model` (logits / temperature, as sampled)."""
        import torch

        logits = model(**batch).logits[:, width - 1:-1].float() / self.p.temperature
        tokens = batch["input_ids"][:, width:]
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def _scores(self, rows: list[dict], completion, mask, batch: dict):
        """One score per completion: the reward model's logit, or the weighted sum of the reward functions
        (called as TRL calls them: prompts, completions, completion_ids and every data column; None = 0)."""
        import torch

        if self.reward_model is not None:
            return self.reward_model(**batch).logits[:, 0].float(), {}
        ids = [row[:int(n)].tolist() for row, n in zip(completion, mask.sum(dim=1))]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [row["prompt"] for row in rows]
        completions: list = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                             for p, t in zip(prompts, texts)]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
        weights = self.p.reward_weights or [1.0] * len(self.rewards)
        total = torch.zeros(len(rows))
        per_function = {}
        for func, weight in zip(self.rewards, weights):
            values = func(prompts=prompts, completions=completions, completion_ids=ids, trainer_state=None,
                          log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns)
            values = torch.tensor([0.0 if v is None else float(v) for v in values])
            per_function[f"rewards/{func.__name__}/mean"] = values.mean().item()
            total += weight * values
        return total, per_function

    # ---- optimisation --------------------------------------------------------------------------------

    def _advantages(self, rollout: dict) -> dict:
        from clusterctl.training.rl import ppo_math

        mask = rollout["mask"]
        rewards, kl = ppo_math.token_rewards(rollout["scores"], rollout["logprobs"], rollout["ref_logprobs"], mask,
                                             self.kl.value)
        if self.p.whiten_rewards:
            rewards = ppo_math.whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.gae(rewards, rollout["values"], mask, gamma=self.p.gamma, lam=self.p.lam)
        stats = {"advantages/mean": ppo_math.masked_mean(advantages, mask).item(),
                 "advantages/std": ppo_math.masked_var(advantages, mask).sqrt().item(),
                 "returns/mean": ppo_math.masked_mean(returns, mask).item(),
                 "kl": kl.sum(dim=1).mean().item()}
        return {"advantages": ppo_math.whiten(advantages, mask), "returns": returns, "stats": stats}

    def _update(self, rollout: dict, targets: dict, step: int) -> dict:
        """ppo_epochs passes over the rollout in num_mini_batches optimizer steps of actor and critic."""
        import torch

        from clusterctl.training.rl import ppo_math

        sums: dict[str, float] = {}
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + step * self.world + self.rank)
        width = rollout["width"]
        for _ in range(self.p.ppo_epochs):
            order = torch.randperm(self.batch, generator=generator)
            for start in range(0, self.batch, self.mini):
                pick = order[start:start + self.mini]
                batch = {k: v[pick] for k, v in rollout["batch"].items()}
                mask = rollout["mask"][pick]
                policy = ppo_math.policy_loss(self._logprobs(self.actor, batch, width), rollout["logprobs"][pick],
                                              targets["advantages"][pick], mask, self.p.cliprange)
                self.actor.backward(policy.loss)
                self.actor.step()
                values = self.critic(**batch)[:, width - 1:-1]
                vloss, vclip = ppo_math.value_loss(values, rollout["values"][pick], targets["returns"][pick], mask,
                                                   self.p.cliprange_value)
                self.critic.backward(self.p.vf_coef * vloss)
                self.critic.step()
                for key, value in (("policy/loss", policy.loss), ("policy/clipfrac", policy.clipfrac),
                                   ("policy/approx_kl", policy.approx_kl), ("value/loss", vloss),
                                   ("value/clipfrac", vclip)):
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
        updates = self.p.ppo_epochs * self.p.num_mini_batches
        return {key: value / updates for key, value in sums.items()}

    # ---- checkpoints ---------------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        import torch.distributed as dist

        tag = ckpt.tag_for(step)
        if self.rank == 0:  # a marker left by an earlier run must not bless half-overwritten files
            (self.output_dir / tag / ckpt.MARKER).unlink(missing_ok=True)
        dist.barrier()
        self.actor.save_checkpoint(str(self.output_dir), tag=tag, save_latest=False,
                                   client_state={"step": step, "kl_coef": self.kl.value})
        self.critic.save_checkpoint(str(self.output_dir / tag), tag="critic", save_latest=False)
        dist.barrier()
        if self.rank == 0:
            ckpt.publish(self.output_dir, tag, {"step": step, "world_size": self.world, "kind": "ppo",
                                                "zero_stage": self.cfg.zero_stage, "format": "deepspeed"})
            ckpt.prune(self.output_dir, self.cfg.save_total_limit)
        dist.barrier()

    def _resume(self) -> int:
        import torch.distributed as dist

        from clusterctl.training.rl.runner import resume_point

        found = [resume_point(self.output_dir, self.world) if self.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)
        if found[0] is None:
            return 0
        tag = Path(found[0]).name
        _, client = self.actor.load_checkpoint(str(self.output_dir), tag=tag)
        loaded, _ = self.critic.load_checkpoint(str(self.output_dir / tag), tag="critic")
        if loaded is None or client is None:
            raise UserError("DeepSpeed could not load this checkpoint", where=str(self.output_dir / tag),
                            fix="remove its clusterctl-complete.json to resume from the one before")
        self.kl.value = client["kl_coef"]
        if self.rank == 0:
            print(f"resuming from {self.output_dir / tag} at step {client['step']}", flush=True)
        return client["step"]

    # ---- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        import torch
        import torch.distributed as dist

        from clusterctl.training.rl.runner import RLMetrics
        from clusterctl.training.sft import PREEMPTED_EXIT_CODE, PREEMPTED_FILE, Preemption

        cfg = self.cfg
        if self.rank == 0:
            (self.output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        preemption = Preemption()
        step = self._resume()
        metrics = RLMetrics(cfg.metrics_file, cfg.tensorboard_dir, resume_step=step) if self.rank == 0 else None
        preempted = False
        while step < self.max_steps and not preempted:
            started = time.time()
            torch.manual_seed(cfg.seed + step * self.world + self.rank)     # this step's samples, on resume too
            rollout = self._rollout(self._prompts(step))
            targets = self._advantages(rollout)
            losses = self._update(rollout, targets, step)
            self.kl.update(targets["stats"]["kl"], self.batch * self.world)
            tokens = rollout["mask"].sum().item()
            values = {**targets["stats"], **losses, **rollout["per_function"], "reward": rollout["scores"].mean().item(),
                      "reward_std": rollout["scores"].std(correction=0).item(), "completions/mean_length": tokens / self.batch,
                      "tokens": tokens, "preempt": float(preemption.requested)}
            names = sorted(values)
            totals = torch.tensor([values[n] for n in names], dtype=torch.float64)
            dist.all_reduce(totals)
            averaged = {n: (t / self.world if n not in ("tokens", "preempt") else t)
                        for n, t in zip(names, totals.tolist())}
            step += 1
            preempted = averaged.pop("preempt") > 0
            if metrics:
                grad_norm = self.actor.get_global_grad_norm()
                metrics.log(step=step, max_steps=self.max_steps,
                            loss=averaged["policy/loss"] + self.p.vf_coef * averaged["value/loss"],
                            lr=self.actor.get_lr()[0], kl_coef=self.kl.value,
                            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                            tokens_per_s=averaged.pop("tokens") / (time.time() - started), **averaged)
            if step % cfg.save_steps == 0 or step == self.max_steps or preempted:
                self._save(step)
        if metrics:
            metrics.close()
        if preempted and self.rank == 0:
            atomic_write_text(self.output_dir / PREEMPTED_FILE,
                              json.dumps({"step": step, "tag": ckpt.tag_for(step), "time": time.time()}) + "\n")
        dist.barrier()
        return PREEMPTED_EXIT_CODE if preempted else 0


def main(argv: list[str] | None = None) -> int:
    from clusterctl.training.rl.runner import node_config

    try:
        return PPOTrainer(node_config(argv, "python -m clusterctl.training.rl.ppo")).run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    from clusterctl.training.sft import exit_now

    exit_now(main())
