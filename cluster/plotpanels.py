"""Which curves `clusterctl plot` draws, from the keys a training stage's metrics.jsonl holds: loss for
every kind; for GRPO the reward mean beside each reward function's (`reward`, `rewards/<func>/mean`) and
KL when logged (beta > 0); for DPO/SimPO the preference margins and accuracies; the learning rate last.
No plotting library here: `--json` prints the same series."""
from __future__ import annotations

import math
from dataclasses import dataclass

# The training stages that write metrics.jsonl, in the order a run folder is searched for one.
TRAINING_STAGES = ("sft", "grpo", "dpo", "simpo", "ppo")


@dataclass(frozen=True)
class Panel:
    label: str                  # the y axis
    keys: tuple[str, ...]       # metrics.jsonl keys drawn in it, one line each


def _reward_functions(keys: set[str]) -> list[str]:
    return sorted(k for k in keys if k.startswith("rewards/") and k.endswith("/mean"))


def panels(records: list[dict]) -> list[Panel]:
    """The panels these records can fill, top to bottom; a panel with no logged key is left out."""
    keys: set[str] = set().union(*(r.keys() for r in records)) if records else set()
    candidates = [
        Panel("loss", ("loss", "eval_loss")),
        Panel("reward", ("reward", *_reward_functions(keys))),
        Panel("KL", ("kl",)),
        Panel("preference margin", ("rewards/margins", "rewards/chosen", "rewards/rejected")),
        Panel("preference accuracy", ("rewards/accuracies",)),
        Panel("learning rate", ("lr",)),
    ]
    chosen = []
    for panel in candidates:
        present = tuple(k for k in panel.keys if k in keys)
        if present:
            chosen.append(Panel(panel.label, present))
    return chosen


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, skipping steps where it was not logged or not a finite number
    (TRL logs None for a reward that returned None for every completion)."""
    points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
    return [s for s, _ in points], [float(v) for _, v in points]
