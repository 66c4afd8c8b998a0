"""The health library and command without a server: reasoning split, curl lines, percentiles, where a
run's endpoint is found, and failing fast (and clearly) when nothing answers. Against a real vLLM:
test_vllm_serve.py."""
from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from clusterctl.commands.health import command, endpoint_of_run
from clusterctl.errors import UserError
from clusterctl.health import Endpoint, LoadResult, check_endpoint, curl_line, split_reasoning


@pytest.mark.parametrize("message, expected", [
    ({"content": "Paris.", "reasoning_content": "The capital is Paris."}, ("The capital is Paris.", "Paris.")),
    ({"content": "Paris.", "reasoning": "think"}, ("think", "Paris.")),
    ({"content": "<think>\nfirst\n</think>\n\nanswer"}, ("first", "answer")),
    ({"content": "opened by the template</think>answer"}, ("opened by the template", "answer")),
    ({"content": "plain answer"}, ("", "plain answer")),
    ({"content": None, "reasoning_content": "all thinking"}, ("all thinking", "")),
])
def test_reasoning_is_shown_apart_from_the_answer(message, expected):
    assert split_reasoning(message) == expected


def test_curl_line_repeats_the_request_and_never_shows_the_key():
    endpoint = Endpoint("http://node0:8000", model="r1", api_key="sk-secret")
    line = curl_line(endpoint, "POST", "/v1/chat/completions", {"model": "r1", "messages": [{"role": "user", "content": "it's"}]})
    assert line.startswith("curl -sS -X POST http://node0:8000/v1/chat/completions -H 'Content-Type: application/json'")
    assert '-H "Authorization: Bearer $VLLM_API_KEY"' in line and "sk-secret" not in line
    assert """-d '{"model": "r1", "messages": [{"role": "user", "content": "it'"'"'s"}]}'""" in line
    assert curl_line(Endpoint("http://h:1"), "GET", "/health") == "curl -sS http://h:1/health"


def test_percentiles_are_nearest_rank():
    load = LoadResult(requests=20, concurrency=4, ok=20, wall_s=2.0, latencies_s=[i / 10 for i in range(1, 21)],
                      completion_tokens=400)
    assert load.percentile(50) == pytest.approx(1.0) and load.percentile(95) == pytest.approx(1.9)
    assert load.requests_per_s == 10 and load.tokens_per_s == 200 and load.passed
    assert LoadResult(requests=3, concurrency=1, ok=0, wall_s=1.0).percentile(95) == 0.0


def test_nothing_listening_fails_at_the_deadline_with_retries():
    start = time.monotonic()
    checks = check_endpoint(Endpoint("http://127.0.0.1:9"), timeout=2)
    assert time.monotonic() - start < 6
    assert len(checks) == 1 and not checks[0].ok and checks[0].attempts >= 2
    assert "no answer from http://127.0.0.1:9" in checks[0].detail


def test_command_exits_1_and_prints_the_failed_check():
    result = CliRunner().invoke(command, ["http://127.0.0.1:9", "--timeout", "1"])
    assert result.exit_code == 1
    assert "FAIL  GET /health" in result.output and "curl -sS http://127.0.0.1:9/health" in result.output


def test_command_json_output():
    result = CliRunner().invoke(command, ["http://127.0.0.1:9", "--timeout", "1", "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["ok"] is False and report["checks"][0]["name"] == "GET /health"


def test_run_endpoint_from_run_json_then_from_the_state_file(tmp_path):
    with pytest.raises(UserError, match=r"has no deploy endpoint after 0 s \(no stages.deploy.endpoint"):
        endpoint_of_run(tmp_path)
    (tmp_path / "state" / "deploy").mkdir(parents=True)
    (tmp_path / "state" / "deploy" / "endpoint.json").write_text('{"url": "http://n0:8000", "model": "r1"}')
    assert endpoint_of_run(tmp_path) == Endpoint("http://n0:8000", "r1")
    (tmp_path / "run.json").write_text(json.dumps({"stages": {"deploy": {"endpoint": "http://n1:9000",
                                                                          "served_model": "r1-sft"}}}))
    assert endpoint_of_run(tmp_path) == Endpoint("http://n1:9000", "r1-sft")


def test_a_starting_deploy_is_waited_for_and_a_failed_one_is_not(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"stages": {"deploy": {"state": "FAILED"}}}))
    start = time.monotonic()
    with pytest.raises(UserError, match="its deploy stage is FAILED"):
        endpoint_of_run(tmp_path, wait_s=30)
    assert time.monotonic() - start < 2
    (tmp_path / "run.json").write_text(json.dumps({"stages": {"deploy": {"state": "RUNNING"}}}))
    start = time.monotonic()
    with pytest.raises(UserError, match="after 2 s"):
        endpoint_of_run(tmp_path, wait_s=2)
    assert 2 <= time.monotonic() - start < 5


def test_api_key_file_is_read(tmp_path):
    from clusterctl.commands.health import read_api_key
    (tmp_path / "key").write_text("sk-1\n")
    assert read_api_key(str(tmp_path / "key")) == "sk-1"
    with pytest.raises(UserError, match="cannot read the API key"):
        read_api_key(str(tmp_path / "missing"))
