"""deploy.gate end to end on the local backend: a real sft -> convert chain whose deploy stage refuses
to serve a model that misses the gate (exit 3, the figures in its log, no server), and the same
rendered gate passing a model that meets it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.runs import finished, wait_for  # noqa: F401 - wait_for is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_deploy_refuses_a_model_above_the_gate(clusterctl, wait_for, tmp_path):  # noqa: F811
    submitted = json.loads(clusterctl(
        "submit", "sft", "--detach", "--json", "--set", "data=builtin:tiny-reasoning",   # 70 conversations to hold out from
        "--set", "sft.max_steps=4", "--set", "sft.save_steps=4",
        "--set", "sft.eval_ratio=0.1", "--set", "deploy.gate.max_eval_loss=0.001").stdout)
    status = wait_for(submitted["run"], finished, timeout=800, what="the chain to end at the gate")
    states = {stage: record["state"] for stage, record in status["stages"].items()}
    assert states == {"sft": "COMPLETED", "convert": "COMPLETED", "deploy": "FAILED"}, status
    run_dir = Path(submitted["dir"])
    metrics = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    final = next(r["eval_loss"] for r in metrics if r["step"] == 4)
    log = (run_dir / "logs" / "deploy" / "node-000.log").read_text()
    assert f"eval gate: REFUSED: eval_loss {final:.4f} at step 4 is above the gate's 0.001" in log, log[-2000:]
    assert "vllm" not in log.lower().replace("vllm_port", "")
    assert not status["stages"]["deploy"].get("endpoint")
    gate_line = next(line for line in (run_dir / "deploy" / "node-000.sh").read_text().splitlines()
                     if "clusterctl.training.evaluation gate" in line)
    model = status["stages"]["convert"]["output"]
    assert f"--model {model} --max-eval-loss 0.001 || exit $?" in gate_line

    start = next(r["eval_loss"] for r in metrics if r["step"] == 0)
    assert final < start
    passed = subprocess.run([sys.executable, "-m", "clusterctl.training.evaluation", "gate", "--model", model,
                             "--max-eval-loss", "1000", "--better-than-start"], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip() == f"eval gate: passed: eval_loss {final:.4f} at step 4 (step 0: {start:.4f})"
