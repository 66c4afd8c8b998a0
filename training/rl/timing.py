"""Where a GRPO step's time goes, logged with its metrics (metrics.jsonl, TensorBoard, bench/rl):

    time/rollout    generating the completions (with vllm-server: the weight sync and the server's sampling)
    time/reward     the reward functions
    time/optimizer  the rest of the step: log-prob passes, loss, backward, clipping and the optimizer step
    time/step       the whole optimizer step (all micro-batches)

Rank 0's clock (the ranks wait for one another at every collective). A step that reuses buffered
completions (steps_per_generation or num_iterations > 1) has 0 rollout and reward time.
"""
from __future__ import annotations

import time
from typing import Any


class StepTimings:
    """Mixin for TRL's GRPOTrainer: times its `_generate` and `_calculate_rewards` calls."""

    _step_spent: dict[str, float]

    def _spend(self, key: str, started: float) -> None:
        spent = getattr(self, "_step_spent", None)
        if spent is None:
            spent = self._step_spent = {}
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - started

    def _generate(self: Any, prompts: list):
        started = time.perf_counter()
        try:
            return super()._generate(prompts)  # type: ignore[misc]
        finally:
            self._spend("time/rollout", started)

    def _calculate_rewards(self: Any, *args, **kwargs):
        started = time.perf_counter()
        try:
            return super()._calculate_rewards(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._spend("time/reward", started)


def step_timer(trainer):
    """A TrainerCallback that closes each optimizer step's timings into the trainer's logged metrics
    (on_step_end runs before the step's log)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            trainer._step_spent = {}

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.started
            spent = getattr(trainer, "_step_spent", {})
            rollout, reward = spent.get("time/rollout", 0.0), spent.get("time/reward", 0.0)
            values = {"time/rollout": rollout, "time/reward": reward,
                      "time/optimizer": max(total - rollout - reward, 0.0), "time/step": total}
            for key, value in values.items():
                trainer._metrics["train"][key].append(value)

    return StepTimer()
