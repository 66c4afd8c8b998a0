"""DPO and SimPO for real on the tiny model, 2 ranks under ZeRO-3 on gloo: on a few repeated pairs the
reward margin rises and the chosen answer's log-probability rises relative to the rejected one's."""
from __future__ import annotations

import json

import pytest
from rl_run import read_metrics, run, write_config

from clusterctl.training import checkpoint as ckpt

pytestmark = pytest.mark.slow
PAIRS = [("What is 2 + 3?", " 2 + 3 = 5.", " 2 + 3 = 7."), ("What is 4 + 4?", " 4 + 4 = 8.", " 4 + 4 = 9."),
         ("Is the sky blue?", " Yes, it is.", " No idea."), ("Name a colour.", " Red.", " Dunno.")]


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_margins_and_chosen_log_probability_rise(tmp_path, kind):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    config = write_config(tmp_path / "job", kind=kind, data=str(data), micro_batch=2, max_length=64,
                          epochs=10, lr=1e-3, save_steps=5, preference={"beta": 0.1 if kind == "dpo" else 2.0})
    run("preference", config)
    metrics = read_metrics(tmp_path / "job" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))     # 4 pairs = 1 step of 2 ranks x 2, 10 epochs
    margins = [m["rewards/margins"] for m in metrics]
    gap = [m["logps/chosen"] - m["logps/rejected"] for m in metrics]
    assert sum(margins[-3:]) / 3 > sum(margins[:3]) / 3 + 0.1, margins
    assert sum(gap[-3:]) / 3 > sum(gap[:3]) / 3 + 0.5, gap
    assert metrics[-1]["rewards/accuracies"] == 1.0
    checkpoints = tmp_path / "job" / "checkpoints"
    assert ckpt.complete_tags(checkpoints) == ["step-5", "step-10"]
