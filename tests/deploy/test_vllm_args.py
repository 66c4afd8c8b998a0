"""`vllm serve` arguments by vLLM version, and the deploy spec's parallelism rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clusterctl.deploy.vllm_args import (
    check_parallel,
    installed_vllm_version,
    reasoning_flags,
    resolve_parallel,
    serve_args,
    version_tuple,
)
from clusterctl.errors import ConfigError, UserError

R1 = {"num_attention_heads": 128, "num_hidden_layers": 61}


@pytest.mark.parametrize("version, flags", [
    ("0.8.5", ["--enable-reasoning", "--reasoning-parser", "deepseek_r1"]),
    ("0.7.3.post1", ["--enable-reasoning", "--reasoning-parser", "deepseek_r1"]),
    ("0.9.0", ["--reasoning-parser", "deepseek_r1"]),
    ("0.10.1rc2+cu126", ["--reasoning-parser", "deepseek_r1"]),
    ("0.32.0+cpu", ["--reasoning-parser", "deepseek_r1"]),
])
def test_reasoning_flags_follow_the_vllm_release(version, flags):
    assert reasoning_flags("deepseek_r1", version) == flags


def test_no_parser_no_flags_and_too_old_a_vllm_is_refused():
    assert reasoning_flags("", "0.5.0") == []
    with pytest.raises(UserError, match="0.6.4 has no reasoning parser support") as error:
        reasoning_flags("deepseek_r1", "0.6.4")
    assert "reasoning_parser" in str(error.value)


def test_version_tuple_reads_release_numbers_only():
    assert version_tuple("0.10.1rc2+cu126") == (0, 10, 1)
    with pytest.raises(UserError):
        version_tuple("dev")


@pytest.mark.parametrize("given, gpus, nodes, expected", [
    ((0, 0), 8, 4, (8, 4)),        # defaults: tp = GPUs per node, pp = nodes
    ((4, 0), 8, 4, (4, 4)),
    ((0, 2), 8, 4, (8, 2)),
    ((0, 0), 0, 4, (1, 1)),        # CPU: one node serves
])
def test_parallel_defaults(given, gpus, nodes, expected):
    assert resolve_parallel(*given, gpus_per_node=gpus, nodes=nodes) == expected


def test_tensor_parallel_must_divide_the_heads_and_the_error_lists_divisors():
    check_parallel(8, 4, gpus_per_node=8, nodes=4, model_config=R1)
    with pytest.raises(ConfigError) as error:
        check_parallel(6, 4, gpus_per_node=8, nodes=4, model_config=R1,
                       where=lambda field: f"job.yaml:12: deploy.{field}")
    text = str(error.value)
    assert text.startswith("job.yaml:12: deploy.tensor_parallel: tensor_parallel 6 does not divide the model's 128")
    assert "[1, 2, 4, 8, 16, 32, 64, 128]" in text


def test_pipeline_may_split_layers_unevenly_but_not_exceed_them():
    check_parallel(1, 4, gpus_per_node=1, nodes=4, model_config=R1)       # 61 layers over 4 stages is fine
    with pytest.raises(ConfigError, match="pipeline_parallel 62 is larger than the model's 61 layers"):
        check_parallel(1, 62, gpus_per_node=1, nodes=62, model_config=R1)


def test_more_gpus_than_the_deployment_has_is_refused_before_vllm_would_hang():
    with pytest.raises(ConfigError, match="= 64 GPUs, but 4 nodes x 8 GPUs = 32"):
        check_parallel(16, 4, gpus_per_node=8, nodes=4)


def test_cpu_nodes_refuse_pipeline_parallel():
    with pytest.raises(ConfigError, match="not supported on CPU-only nodes"):
        check_parallel(1, 2, gpus_per_node=0, nodes=2)


def test_serve_args_for_the_reference_deployment():
    args = serve_args("/models/r1", served_model_name="deepseek-r1-sft", host="0.0.0.0", port=8000,
                      tensor_parallel=8, pipeline_parallel=4, executor="ray", max_model_len=32768,
                      reasoning_parser="deepseek_r1", trust_remote_code=True, version="0.11.0")
    assert args == ["/models/r1", "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "deepseek-r1-sft",
                    "--tensor-parallel-size", "8", "--pipeline-parallel-size", "4",
                    "--distributed-executor-backend", "ray", "--max-model-len", "32768", "--trust-remote-code",
                    "--reasoning-parser", "deepseek_r1"]


def test_an_api_key_in_extra_args_is_refused():
    for extra in (["--api-key", "sk-1"], ["--api-key=sk-1"]):
        with pytest.raises(ConfigError, match="deploy.api_key_file"):
            serve_args("/m", served_model_name="m", host="h", port=1, extra_args=extra, version="0.11.0")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clusterctl.deploy.vllm_args", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_on_this_node_multi_node_gpu_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(R1))
    result = run_cli("--model", tmp_path, "--served-model-name", "r1", "--nodes", 4, "--gpus-per-node", 8,
                     "--reasoning-parser", "deepseek_r1", "--", "--enforce-eager")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert "--tensor-parallel-size 8 --pipeline-parallel-size 4 --distributed-executor-backend ray" in line
    assert line.endswith("--reasoning-parser deepseek_r1 --enforce-eager")
    assert "--enable-reasoning" not in line          # the installed vLLM is 0.32: the old flag is rejected
    assert "rotary_embedding" not in line            # the CPU build's workaround stays off GPU nodes


def test_cli_null_output_and_cpu_single_node(tmp_path):
    result = run_cli("--model", tmp_path / "my model", "--null", "--nodes", 2, "--gpus-per-node", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\0")[:-1] == [str(tmp_path / "my model"), "--host", "0.0.0.0", "--port", "8000",
                                              # eager, and vLLM's exact rotary path (its CPU op rotates one head)
                                              "--enforce-eager", "--compilation-config",
                                              '{"custom_ops": ["-rotary_embedding"]}']


def test_cli_checks_the_model_config_on_the_node(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(R1))
    result = run_cli("--model", tmp_path, "--tensor-parallel", 3, "--nodes", 1, "--gpus-per-node", 8)
    assert result.returncode == 2
    assert "deploy.tensor_parallel: tensor_parallel 3 does not divide the model's 128 attention heads" in result.stderr


@pytest.mark.slow
def test_the_installed_vllm_accepts_our_flags_and_rejects_enable_reasoning(tmp_path):
    """The real `vllm serve` on an empty folder: our flags get past its argument parser (it then fails on
    the missing config.json), while the recipe's --enable-reasoning is refused by name."""
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    ours = serve_args(str(tmp_path), served_model_name="r1", host="127.0.0.1", port=8000, tensor_parallel=2,
                      executor="mp", max_model_len=4096, reasoning_parser="deepseek_r1",
                      version=installed_vllm_version())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    accepted = subprocess.run([vllm, "serve", *ours], capture_output=True, text=True, timeout=300, env=env)
    assert accepted.returncode != 0 and "unrecognized arguments" not in accepted.stderr
    assert "config.json" in accepted.stdout + accepted.stderr
    old = subprocess.run([vllm, "serve", str(tmp_path), "--enable-reasoning", "--reasoning-parser", "deepseek_r1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert "unrecognized arguments: --enable-reasoning" in old.stderr
