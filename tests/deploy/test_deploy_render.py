"""What the deploy template renders for each shape (4 nodes x 8 GPUs on Slurm, one node, CPU-only
multi-node), that it is valid bash, and that hostile values and the API key never reach it as code.
(Golden files of the whole run folder: tests/spine/test_render.py.)"""
from __future__ import annotations

import subprocess

from clusterctl.backends.base import backend_for
from clusterctl.config import ClusterConfig, DeploySpec, JobSpec
from clusterctl.render import render_stage
from clusterctl.run import Run


def render(*, nodes=4, gpus=8, interface="ib0", **spec) -> dict[str, str]:
    cluster = ClusterConfig(backend="slurm", gpus_per_node=gpus, python="/opt/venv/bin/python", interface=interface)
    job = JobSpec(name="r1", deploy=DeploySpec(nodes=nodes, **{"served_model_name": "deepseek-r1-sft", **spec}))
    files = render_stage(Run("/shared/runs/20260101-000000-abcd"), "deploy", cluster=cluster, job=job,
                         backend=backend_for(cluster), master_port=15000, overrides={"model": "/models/r1 sft"})
    for name, text in files.items():
        if name.endswith(".sh"):
            check = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
            assert check.returncode == 0, f"{name}: {check.stderr}"
    return files


def body(text: str) -> str:
    """The deploy part of a node script (after the base template's environment set-up)."""
    return text[text.index("VLLM_PORT="):]


def test_four_nodes_of_eight_gpus_ray_head_gate_and_vllm_with_ray_executor():
    files = render(tensor_parallel=8, pipeline_parallel=4, max_model_len=32768)
    head = body(files["deploy/node-000.sh"])
    assert 'ray_start --head --port="$RAY_PORT" --dashboard-host=127.0.0.1' in head
    assert "--num-gpus=8" in head and "--node-ip-address=\"$NODE_IP\"" in head
    assert "INTERFACE=ib0" in head and 'node_ip --interface "$INTERFACE" --toward "$MASTER_ADDR"' in head
    assert 'export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$INTERFACE}"' in head
    assert ("clusterctl.deploy.wait_ray --address \"$NODE_IP:$RAY_PORT\" --nodes \"$NNODES\" \\\n"
            "  --gpus 32 --timeout 1800 --state-dir \"$STATE_DIR\"") in head
    assert 'export RAY_ADDRESS="$NODE_IP:$RAY_PORT"' in head
    assert "--tensor-parallel 8 --pipeline-parallel 4" in head and "--gpus-per-node 8" in head
    assert "--max-model-len 32768" in head and "--reasoning-parser deepseek_r1" in head
    assert "--model '/models/r1 sft'" in head
    assert "--enforce-eager" not in head
    # the gate runs before vLLM starts, and vLLM before the endpoint is published
    assert head.index("wait_ray") < head.index('"$CLUSTERCTL_BIN/vllm" serve') < head.index("clusterctl.deploy.ready")
    for rank in (1, 2, 3):
        worker = body(files[f"deploy/node-{rank:03d}.sh"])
        assert 'ray_start --address="$MASTER_ADDR:$RAY_PORT"' in worker
        assert "vllm serve" not in worker and "wait_ray" not in worker and "--head" not in worker


def test_one_node_starts_no_ray():
    text = body(render(nodes=1)["deploy/node-000.sh"])
    assert "ray" not in text.lower()
    assert '"$CLUSTERCTL_BIN/vllm" serve "${vllm_args[@]}"' in text


def test_cpu_nodes_start_and_gate_ray_but_serve_from_node_zero_without_the_ray_executor():
    files = render(nodes=2, gpus=0, interface="")
    head = body(files["deploy/node-000.sh"])
    assert "ray_start --head" in head and "--gpus 0 --timeout" in head
    assert "RAY_ADDRESS" not in head and "--gpus-per-node 0" in head   # vllm_args adds the CPU flags
    assert 'VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"' in head
    assert "INTERFACE=''" in head and "NCCL_SOCKET_IFNAME" not in head


def test_api_key_is_read_on_the_node_from_the_file_not_rendered(tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-never-rendered\n")
    text = render(api_key_file=str(key))["deploy/node-000.sh"]
    assert "sk-never-rendered" not in text
    assert f"key_file={key}" in text
    assert 'VLLM_API_KEY="$api_key" setsid "$CLUSTERCTL_BIN/vllm" serve' in text
    assert "--api-key" not in text


def test_hostile_values_are_quoted_data(tmp_path):
    text = render(nodes=1, served_model_name="x'; touch /tmp/pwned; echo '$(id)",
                  extra_args=["--chat-template", "a b$(id)"], host="0.0.0.0")["deploy/node-000.sh"]
    assert """--served-model-name 'x'"'"'; touch /tmp/pwned; echo '"'"'$(id)'""" in text
    assert "'a b$(id)'" in text


def test_default_parallelism_is_left_to_the_node():
    head = body(render(nodes=4)["deploy/node-000.sh"])
    assert "--tensor-parallel 0 --pipeline-parallel 0" in head     # 0: GPUs per node and nodes, resolved by vllm_args


def test_an_odd_interface_name_reaches_nccl_and_gloo_unchanged():
    head = render(interface="eth 0'$(id)")["deploy/node-000.sh"]
    lines = [line for line in head.splitlines() if line.startswith(("INTERFACE=", "export NCCL_SOCKET_IFNAME="))]
    result = subprocess.run(["bash", "-c", "\n".join(lines) + '\nprintf "%s|%s" "$NCCL_SOCKET_IFNAME" "$GLOO_SOCKET_IFNAME"'],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.stdout == "eth 0'$(id)|eth 0'$(id)"
