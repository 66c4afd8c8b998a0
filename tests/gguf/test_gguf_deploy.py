"""deploy.engine: llamacpp for real: the deploy node script exports the tiny DeepSeek-V3 to GGUF itself (none
exported yet), serves it with llama-server, publishes state/deploy/endpoint.json, passes `clusterctl health`,
answers with transformers' greedy tokens, and leaves nothing running once cancelled."""
from __future__ import annotations

import json
import time

import pytest
from fixtures.ports import free_port

from tests.deploy.conftest import NodeScripts, render_deploy
from tests.gguf.conftest import greedy_reference, served_greedy


@pytest.mark.slow
def test_llamacpp_deploy_exports_serves_and_passes_health(toolchain, clusterctl, tmp_path, tiny_model):
    run = render_deploy(tmp_path / "run", model=tiny_model, vllm_port=free_port(), engine="llamacpp",
                        gguf_type="f32", extra_args=["--threads", "2", "--cache-type-k", "f32", "--cache-type-v", "f32"])
    scripts = NodeScripts(run, 1)
    scripts.start(0)
    endpoint_file = run.state_dir("deploy") / "endpoint.json"
    try:
        deadline = time.monotonic() + 240
        while not endpoint_file.exists():
            assert scripts.procs[0].poll() is None and time.monotonic() < deadline, scripts.logs()
            time.sleep(0.5)
        endpoint = json.loads(endpoint_file.read_text())
        assert endpoint["model"] == "tiny-r1" and endpoint["url"].startswith("http://127.0.0.1:"), endpoint
        log = scripts.log(0)
        assert f"converting {tiny_model} -> {run.id}-f32.gguf (f32)" in log, log[-3000:]
        assert (run.dir / "export" / f"{run.id}-f32.gguf").is_file()
        health = clusterctl("health", run.dir, "--timeout", "120", check=False)
        assert health.returncode == 0, health.stdout + health.stderr + scripts.logs()
        assert "PASS  POST /v1/chat/completions" in health.stdout and "model tiny-r1" in health.stdout
        ids = [1, 50, 60, 70, 80, 90]
        want = greedy_reference(tiny_model, ids, 12)
        assert len(want) >= 4 and served_greedy(endpoint["url"], ids, 12)[:len(want)] == want
    finally:
        codes = scripts.terminate()
    assert codes[0] is not None, scripts.logs()
    assert scripts.leftovers() == []
