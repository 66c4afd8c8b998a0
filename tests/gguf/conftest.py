"""GGUF tests: the llama.cpp install.sh builds (a missing one FAILS the tests: CI installs it), the tiny models,
a llama-server started on a GGUF and stopped whatever happens, and transformers' greedy tokens to compare."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from fixtures.ports import free_port
from fixtures.runs import as_submitted

from clusterctl.run import Run
from tests.lora.conftest import tiny_llama, tiny_model  # noqa: F401 - the same tiny models as the LoRA tests


@pytest.fixture(scope="session")
def toolchain():
    from clusterctl.convert.gguf import find_toolchain
    from clusterctl.errors import UserError

    try:
        return find_toolchain()
    except UserError as error:
        pytest.fail(f"the llama.cpp build these tests need is missing; run install.sh\n{error}")


def request(url: str, body: dict | None = None, timeout: float = 120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return json.loads(reply.read())


@contextmanager
def llama_server(toolchain, gguf: Path, log: Path):
    """llama-server on loopback serving `gguf` (f32 KV cache: compared with transformers' f32); yields its URL."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(toolchain.server), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                 "--ctx-size", "512", "--threads", "2", "--no-webui", "--cache-type-k", "f32",
                                 "--cache-type-v", "f32"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                request(url + "/health", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"llama-server did not start:\n{log.read_text(errors='replace')[-3000:]}") from None
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def served_greedy(url: str, ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of token ids (its own completion endpoint returns the token ids)."""
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True, "return_tokens": True,
            "cache_prompt": False}
    return request(url + "/completion", body)["tokens"]


def greedy_reference(model_dir: Path, ids: list[int], n: int) -> list[int]:
    """transformers' f32 greedy tokens, stopping at the first near-tie (either token is a right answer)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    context, out = torch.tensor([ids]), []
    for _ in range(n):
        with torch.no_grad():
            top2 = torch.topk(model(context).logits[0, -1], 2)
        if float(top2.values[0] - top2.values[1]) < 1e-3:
            break
        out.append(int(top2.indices[0]))
        context = torch.cat([context, top2.indices[:1].view(1, 1)], dim=1)
    return out


PROMPTS = ([1, 50, 60, 70, 80, 90], [1, 200, 17, 300], [1, 5, 400, 33, 120, 77, 9])


def dry_run(clusterctl, tmp_path, job: str = "", *args) -> Run:
    (tmp_path / "job.yaml").write_text(job or "name: tiny\n")
    out = clusterctl("submit", "sft", "--dry-run", "--json", "--job", tmp_path / "job.yaml", *args)
    return Run(json.loads(out.stdout)["dir"])


def converted_run(clusterctl, tmp_path, model: Path) -> Run:
    """A run whose convert stage completed with a copy of `model` as its output (with the marker
    `clusterctl convert` leaves)."""
    from clusterctl.atomic import write_marker

    model = Path(shutil.copytree(model, tmp_path / "converted"))
    write_marker(model, {"source": "test"})
    run = dry_run(clusterctl, tmp_path)
    as_submitted(run.dir, state="COMPLETED")
    run.update(lambda data: data["stages"]["convert"].update(output=str(model)))
    return run
