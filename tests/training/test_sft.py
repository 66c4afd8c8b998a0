"""Real multi-rank DeepSpeed runs of the tiny model on CPU (gloo): training, SP equivalence, resume, preemption."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from sft_run import read_metrics, run_sft, sft_command, sft_env, write_config

from clusterctl.training import checkpoint as ckpt
from clusterctl.training.sft import PREEMPTED_EXIT_CODE, PREEMPTED_FILE

pytestmark = pytest.mark.slow


def wait_for_step(metrics, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(m["step"] >= step for m in read_metrics(metrics)):
            return
        assert proc.poll() is None, f"sft exited early with {proc.returncode}"
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_two_rank_zero3_builtin_model_trains_and_checkpoints(tmp_path):
    config = write_config(tmp_path / "sft", max_steps=8, save_steps=4, save_total_limit=1,
                          tensorboard_dir=str(tmp_path / "sft" / "tensorboard"))
    out = run_sft(config).stdout
    metrics = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert {"step", "max_steps", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "time"} <= set(metrics[0])
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3, [m["loss"] for m in metrics]
    assert "step 8/8  loss" in out
    checkpoints = tmp_path / "sft" / "checkpoints"
    assert ckpt.complete_tags(checkpoints) == ["step-8"]                 # save_total_limit 1 pruned step-4
    assert (checkpoints / "latest").read_text() == "step-8"
    marker = json.loads((checkpoints / "step-8" / ckpt.MARKER).read_text())
    assert marker["step"] == 8 and marker["world_size"] == 2 and marker["zero_stage"] == 3
    assert len(list((checkpoints / "step-8").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    hf_config = json.loads((checkpoints / "hf" / "config.json").read_text())
    assert hf_config["topk_method"] == "noaux_tc" and (checkpoints / "hf" / "tokenizer.json").is_file()
    name_map = json.loads((checkpoints / "hf" / "clusterctl-layout.json").read_text())  # convert reads it
    first_view = name_map["views"]["model.layers.1.mlp.experts.gate_up_proj"][0]
    assert first_view[0] == "model.layers.1.mlp.experts.0.gate_proj.weight" and first_view[1] == 0
    assert (tmp_path / "sft" / "base-model" / ckpt.MARKER).is_file()      # the built-in model, built by rank 0
    assert list((tmp_path / "sft" / "tensorboard").glob("events.out.tfevents.*"))
    again = run_sft(config)                                             # already done: nothing retrained
    assert "resumed from" in again.stdout and len(read_metrics(tmp_path / "sft" / "metrics.jsonl")) == 8


def test_sequence_parallel_2_equals_no_sequence_parallel(tmp_path, tiny_model):
    """Same global batch (one data-parallel group either way): same loss and gradients for 3 steps."""
    common = dict(model=str(tiny_model), bf16=False, grad_accum=1, max_steps=3, warmup_ratio=0.0, save_steps=100)
    runs = {}
    for sp in (1, 2):
        config = write_config(tmp_path / f"sp{sp}", sequence_parallel=sp, **common)
        run_sft(config, nproc=sp)
        runs[sp] = read_metrics(tmp_path / f"sp{sp}" / "metrics.jsonl")
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path, tiny_model):
    config = write_config(tmp_path / "sft", model=str(tiny_model), grad_accum=1, max_steps=6, save_steps=2)
    metrics, checkpoints = tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "checkpoints"
    proc = subprocess.Popen(sft_command(config, 2), env=sft_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(metrics, 3, proc)
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)                             # the node script's group: torchrun
        proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(ranks, timeout=30)                  # ranks live in their own sessions
    assert not alive, "a rank outlived its launcher"
    killed = {m["step"]: m for m in read_metrics(metrics)}
    assert ckpt.latest_complete(checkpoints) in ("step-2", "step-4")
    (checkpoints / "step-5").mkdir()                                    # an interrupted save: no marker
    (checkpoints / "step-5" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    resume_tag = ckpt.latest_complete(checkpoints)
    out = run_sft(config).stdout
    assert f"resumed from {checkpoints / resume_tag} at step {ckpt.step_of(resume_tag)}" in out
    resumed = read_metrics(metrics)
    assert [m["step"] for m in resumed] == list(range(1, 7))            # replayed steps replaced, not duplicated
    for m in resumed:
        if ckpt.step_of(resume_tag) < m["step"] in killed:              # same data order, same loss
            assert m["loss"] == pytest.approx(killed[m["step"]]["loss"], rel=1e-6)
            assert m["lr"] == pytest.approx(killed[m["step"]]["lr"], rel=1e-9)
    assert ckpt.latest_complete(checkpoints) == "step-6" and not (checkpoints / "step-5").exists()


def test_sigusr2_saves_and_exits_for_requeue(tmp_path, tiny_model):
    config = write_config(tmp_path / "sft", model=str(tiny_model), grad_accum=1, max_steps=200, save_steps=100)
    metrics, checkpoints = tmp_path / "sft" / "metrics.jsonl", tmp_path / "sft" / "checkpoints"
    command = sft_command(config, 2)
    command.insert(command.index("--nnodes"), "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2")
    proc = subprocess.Popen(command, env={**sft_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(metrics, 2, proc)
        proc.send_signal(signal.SIGUSR2)                                # torchrun forwards it to the ranks
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    preempted = json.loads((checkpoints / PREEMPTED_FILE).read_text())
    assert preempted["tag"] == ckpt.latest_complete(checkpoints) and preempted["step"] < 200
    assert f"exiting with {PREEMPTED_EXIT_CODE}" in output, output[-3000:]
    assert read_metrics(metrics)[-1]["step"] == preempted["step"]
