"""LoRA SFT of the tiny DeepSeek-V3 on 2 gloo ranks under ZeRO-3: every target group trains, nothing else is
saved or changed, checkpoints are adapter-sized, and a killed run resumes from one."""
import os
import signal
import subprocess
import time

import pytest
from lora_checks import assert_all_groups_targeted, assert_checkpoint_holds_only_adapters
from sft_run import read_metrics, run_sft, sft_command, sft_env, write_config

from clusterctl.training import checkpoint as ckpt

pytestmark = pytest.mark.slow

LORA = {"rank": 4, "alpha": 8, "targets": ["all"]}


def wait_until(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"sft exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout} s")


def test_lora_all_groups_trains_only_adapters_and_resumes_after_kill(tmp_path, tiny_model):
    config = write_config(tmp_path / "sft", model=str(tiny_model), grad_accum=1, max_steps=5, save_steps=2,
                          method="lora", lora=LORA)
    metrics, checkpoints = tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "checkpoints"
    proc = subprocess.Popen(sft_command(config, 2), env=sft_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ckpt.latest_complete(checkpoints) and metrics.exists()
                   and read_metrics(metrics)[-1]["step"] >= 3, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        first_output = proc.communicate(timeout=60)[0]
    killed = {m["step"]: m for m in read_metrics(metrics)}
    resume_tag = ckpt.latest_complete(checkpoints)

    described = assert_all_groups_targeted(checkpoints, rank=4)
    assert "model.layers.0.mlp.gate_proj" in first_output                   # the list printed at start

    out = run_sft(config).stdout
    assert f"resumed from {checkpoints / resume_tag} at step {ckpt.step_of(resume_tag)}" in out
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for m in resumed:                      # the adapter and optimizer came back: the same losses as before
        if ckpt.step_of(resume_tag) < m["step"] in killed:
            assert m["loss"] == pytest.approx(killed[m["step"]]["loss"], rel=1e-6)

    assert_checkpoint_holds_only_adapters(checkpoints / "step-5", described, tiny_model)


def test_lora_with_sequence_parallel_2_equals_no_sequence_parallel(tmp_path, tiny_model):
    """Ulysses over LoRA: the same global batch gives the same loss and gradient norm for 3 steps."""
    common = dict(model=str(tiny_model), bf16=False, grad_accum=1, max_steps=3, warmup_ratio=0.0, save_steps=100,
                  method="lora", lora=LORA)
    runs = {}
    for sp in (1, 2):
        run_sft(write_config(tmp_path / f"sp{sp}", sequence_parallel=sp, **common), nproc=sp)
        runs[sp] = read_metrics(tmp_path / f"sp{sp}" / "metrics.jsonl")
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
