"""The eval settings' checks at submit, the deterministic hold-out, the deploy gate's verdicts and the
eval curve in `clusterctl plot` (the real training run is in test_tracking.py)."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from clusterctl.commands.plot import command as plot_command
from clusterctl.training.evaluation import GATE_FAILED_EXIT_CODE, gate, hold_out


def write_job(tmp_path, sft: dict):
    lines = ["name: sft", "sft:"] + [f"  {key}: {json.dumps(value)}" for key, value in sft.items()]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("sft, line, message", [
    ({"eval_ratio": 0.1, "eval_data": "/data/eval.jsonl"}, 3, "eval_data and eval_ratio both set"),
    ({"eval_ratio": 1.5}, 3, "must be in [0, 1), got 1.5"),
    ({"eval_data": "eval.jsonl"}, 3, "is not an absolute path"),
    ({"select": "best"}, 3, "select: best needs an eval set"),
    ({"eval_ratio": 0.1, "select": "newest"}, 4, "unknown select 'newest'"),
    ({"eval_steps": 10}, 3, "eval_steps without an eval set"),
    ({"report_to": ["tensorboard", "neptune"]}, 3, "unknown tracker(s) 'neptune'"),
])
def test_bad_eval_and_tracking_settings_are_refused_at_submit(clusterctl, tmp_path, sft, line, message):
    job = write_job(tmp_path, sft)
    result = clusterctl("submit", "sft", "--dry-run", "--job", job, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("clusterctl: error: ") and message in result.stderr, result.stderr
    assert f"{job}:{line}" in result.stderr, result.stderr


def test_good_settings_reach_train_json(clusterctl, tmp_path):
    job = write_job(tmp_path, {"eval_ratio": 0.05, "eval_steps": 50, "select": "best",
                               "report_to": ["tensorboard", "mlflow"]})
    out = json.loads(clusterctl("submit", "sft", "--dry-run", "--json", "--job", job).stdout)
    train = json.loads((tmp_path / "runs" / out["run"] / "sft" / "train.json").read_text())
    assert {k: train[k] for k in ("eval_ratio", "eval_steps", "select", "report_to")} == \
        {"eval_ratio": 0.05, "eval_steps": 50, "select": "best", "report_to": ["tensorboard", "mlflow"]}


def test_hold_out_is_deterministic_and_leaves_training_data():
    first = hold_out(1000, 0.05, seed=42)
    assert first == hold_out(1000, 0.05, seed=42) and len(first) == 50 and first <= set(range(1000))
    assert first != hold_out(1000, 0.05, seed=43)
    assert len(hold_out(10, 0.01, seed=1)) == 1            # at least one
    assert hold_out(1, 0.5, seed=1) == set()               # never every conversation


def write_metrics(path, evals: dict[int, float]):
    lines = [{"step": 0, "max_steps": 4, "eval_loss": evals.pop(0)}] if 0 in evals else []
    for step in range(1, 5):
        lines.append({"step": step, "max_steps": 4, "loss": 3.0 - step / 4, "lr": 1e-4, "grad_norm": 1.0,
                      "tokens_per_s": 100.0, **({"eval_loss": evals[step]} if step in evals else {})})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_gate_verdicts_name_the_figures(tmp_path):
    improved = write_metrics(tmp_path / "a.jsonl", {0: 2.5, 2: 2.0, 4: 1.75})
    assert gate(improved, max_eval_loss=1.8, better_than_start=True) == \
        (True, "eval_loss 1.7500 at step 4 (step 0: 2.5000)")
    assert gate(improved, max_eval_loss=1.5, better_than_start=False) == \
        (False, "eval_loss 1.7500 at step 4 is above the gate's 1.5")
    worse = write_metrics(tmp_path / "b.jsonl", {0: 2.5, 4: 2.75})
    assert gate(worse, max_eval_loss=None, better_than_start=True) == \
        (False, "eval_loss 2.7500 at step 4 is not better than 2.5000 at step 0")
    no_baseline = write_metrics(tmp_path / "c.jsonl", {4: 1.0})
    assert "no step-0 eval loss" in gate(no_baseline, max_eval_loss=None, better_than_start=True)[1]
    none = write_metrics(tmp_path / "d.jsonl", {})
    assert gate(none, max_eval_loss=9.0, better_than_start=False) == \
        (False, f"no eval loss in {none}: set sft.eval_data or sft.eval_ratio")
    assert "cannot read" in gate(tmp_path / "missing.jsonl", max_eval_loss=9.0, better_than_start=False)[1]

    refused = subprocess.run([sys.executable, "-m", "clusterctl.training.evaluation", "gate", "--metrics",
                              str(worse), "--better-than-start"], capture_output=True, text=True)
    assert refused.returncode == GATE_FAILED_EXIT_CODE
    assert refused.stderr.strip() == \
        "eval gate: REFUSED: eval_loss 2.7500 at step 4 is not better than 2.5000 at step 0"
    passed = subprocess.run([sys.executable, "-m", "clusterctl.training.evaluation", "gate", "--metrics",
                             str(improved), "--max-eval-loss", "2"], capture_output=True, text=True)
    assert passed.returncode == 0 and passed.stdout.startswith("eval gate: passed: eval_loss 1.7500")


def test_plot_draws_the_eval_curve(tmp_path):
    run = tmp_path / "20260101-000000-abcd"
    (run / "sft").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    write_metrics(run / "sft" / "metrics.jsonl", {0: 2.5, 2: 2.0, 4: 1.75})
    result = CliRunner().invoke(plot_command, [str(run), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["steps"] == 4 and summary["first_loss"] == 2.75
    assert summary["eval_loss"] == {"0": 2.5, "2": 2.0, "4": 1.75}
    text = CliRunner().invoke(plot_command, [str(run)]).output
    assert "eval loss 2.5000 -> 1.7500" in text
    assert (run / "sft" / "loss.png").read_bytes().startswith(b"\x89PNG")
