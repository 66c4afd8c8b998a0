"""A real one-node deployment: the rendered deploy script starts vLLM's CPU build on the tiny DeepSeek-V3
as the convert stage wrote it (127.0.0.1 only, API key from a file), publishes endpoint.json once healthy, passes `clusterctl health`
(also under load), serves the same greedy tokens as transformers, and stops cleanly on cancel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

from tests.deploy.conftest import NodeScripts, free_port, render_deploy
from tests.fixtures.netns import wait_until

pytestmark = pytest.mark.slow
API_KEY = "sk-clusterctl-test-4242"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1 2 3 4 5", "Reasoning: first, we"]


@pytest.fixture(scope="module")
def served(converted_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    run_dir.mkdir()
    key_file = run_dir.parent / "api-key"
    key_file.write_text(API_KEY + "\n")
    run = render_deploy(run_dir, model=converted_model, vllm_port=free_port(), host="127.0.0.1",
                        api_key_file=str(key_file), reasoning_parser="deepseek_r1")
    nodes = NodeScripts(run, 1)
    try:
        proc = nodes.start(0)

        def alive():
            if proc.poll() is not None:
                raise AssertionError(f"the deploy script exited {proc.returncode}:\n{nodes.logs()}")
        endpoint_file = run.state_dir("deploy") / "endpoint.json"
        wait_until(endpoint_file.exists, 400, "vLLM to become healthy (endpoint.json)", alive)
        yield run, nodes, json.loads(endpoint_file.read_text())
    finally:
        nodes.close()


def clusterctl_health(*args, key: str | None = API_KEY, timeout: float = 180):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    if key:
        env["VLLM_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "clusterctl.cli", "health", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_endpoint_json_names_the_url_and_served_model(served):
    run, _, endpoint = served
    assert endpoint["model"] == "tiny-r1"
    assert endpoint["url"].startswith("http://127.0.0.1:")


def test_clusterctl_health_passes_on_the_run_folder_with_curl_lines(served):
    run, _, endpoint = served
    result = clusterctl_health(run.dir)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in ("GET /health", "GET /v1/models", "POST /v1/chat/completions"):
        assert any(line.startswith("PASS") and name in line for line in lines), result.stdout
    assert "serves 'tiny-r1'" in result.stdout
    assert f"curl -sS -X POST {endpoint['url']}/v1/chat/completions" in result.stdout
    assert '"Authorization: Bearer $VLLM_API_KEY"' in result.stdout
    assert API_KEY not in result.stdout + result.stderr
    # The DeepSeek-R1 reasoning parser is on: the tiny model never closes </think>, so all of it is reasoning.
    assert "reasoning: " in result.stdout


def test_load_smoke_test_reports_throughput_and_percentiles(served):
    _, _, endpoint = served
    result = clusterctl_health(endpoint["url"], "--requests", 12, "--concurrency", 3, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    load = report["load"]
    assert report["ok"] and report["model"] == "tiny-r1"
    assert load["ok"] == 12 and load["failed"] == 0
    assert load["requests_per_s"] > 0 and load["tokens_per_s"] > 0
    assert 0 < load["p50_s"] <= load["p95_s"]


def test_without_the_key_the_check_fails_and_says_how_to_fix_it(served):
    _, _, endpoint = served
    result = clusterctl_health(endpoint["url"], "--timeout", 5, key=None)
    assert result.returncode == 1
    assert "HTTP 401" in result.stdout and "VLLM_API_KEY" in result.stdout


def test_the_key_is_never_in_the_script_the_log_or_a_command_line(served):
    run, nodes, _ = served
    assert API_KEY not in run.node_script("deploy", 0).read_text()
    assert API_KEY not in nodes.log(0)
    for pid in nodes.leftovers():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert API_KEY.encode() not in f.read()
        except FileNotFoundError:
            pass


def _greedy_vllm(url: str, prompt_ids: list[int], n: int) -> list[int]:
    body = {"model": "tiny-r1", "prompt": prompt_ids, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["choices"][0]["token_ids"]


def test_greedy_tokens_match_transformers_up_to_the_first_near_tie(served, converted_model):
    """Random tiny weights make near-ties; past the first position where transformers' top two logits are
    within 0.01, bf16 rounding may pick either, so the comparison stops there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, endpoint = served
    tokenizer = AutoTokenizer.from_pretrained(converted_model)
    model = AutoModelForCausalLM.from_pretrained(converted_model, dtype=torch.float32).eval()
    n, compared = 24, 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        served_ids = _greedy_vllm(endpoint["url"], ids, n)
        context = torch.tensor([ids])
        for position in range(n):
            with torch.no_grad():
                logits = model(context).logits[0, -1]
            top2 = torch.topk(logits, 2)
            if float(top2.values[0] - top2.values[1]) < 0.01:
                break
            expected = int(top2.indices[0])
            assert served_ids[position] == expected, (
                f"prompt {prompt!r}: token {position} served {served_ids[position]}, transformers {expected} "
                f"(top-2 gap {float(top2.values[0] - top2.values[1]):.4f}); served {served_ids}")
            compared += 1
            context = torch.cat([context, top2.indices[:1].view(1, 1)], dim=1)
    assert compared >= len(PROMPTS) * 3, f"only {compared} tokens compared before near-ties"


def test_cancel_stops_vllm_and_leaves_no_process(served):
    run, nodes, endpoint = served
    codes = nodes.terminate(grace=60)
    assert codes[0] == 143, nodes.logs()
    assert (run.state_dir("deploy") / "node-000.exit").read_text().strip() == "143"
    assert nodes.leftovers() == [], f"still running after cancel: {nodes.leftovers()}"
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint["url"] + "/health", timeout=2)
