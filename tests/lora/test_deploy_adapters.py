"""deploy.lora: adapters in the job spec: refused for MoE models on CPU and for full-SFT runs at submit; on GPU
nodes the deploy script serves the base with this run's adapter and the named ones; on the local backend two
dense tiny Llama LoRA runs (SFT, merge) are served by one vLLM CPU server (`clusterctl deploy B --adapter
math=run:A`), which passes `clusterctl health` by every served name and answers with each adapter's greedy
tokens as transformers + peft."""
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from fixtures.ports import free_port

from clusterctl.procs import processes_with_env

MODELS = Path(__file__).parents[1] / "data" / "models"


def submit(clusterctl, tmp_path, cluster: str, job: str, *args, check=False):
    (tmp_path / "cluster.yaml").write_text(cluster)
    (tmp_path / "job.yaml").write_text(job)
    return clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", tmp_path / "job.yaml",
                      *args, check=check)


def test_adapters_on_a_moe_model_are_refused_on_cpu_and_rendered_on_gpu(clusterctl, tmp_path):
    refused = submit(clusterctl, tmp_path, "backend: local\n",
                     "sft: {method: lora}\ndeploy:\n  lora: adapters\n", "--dry-run")
    assert refused.returncode == 2 and "job.yaml:3: deploy.lora" in refused.stderr, refused.stderr
    assert "CPU build cannot serve LoRA adapters on a MoE model" in refused.stderr
    full = submit(clusterctl, tmp_path, "backend: local\n", "deploy: {lora: adapters}\n", "--dry-run")
    assert full.returncode == 2 and "needs a LoRA run" in full.stderr

    shutil.copytree(MODELS / "deepseek-v3", tmp_path / "v3")
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    job = (f"model: {tmp_path / 'v3'}\ndata: train.jsonl\nsft: {{nodes: 3, max_length: 4096, method: lora, offload_optimizer: true, "
           "offload_param: true}\ndeploy: {nodes: 4, served_model_name: r1-math, lora: adapters, "
           "adapters: ['chat=/shared/adapters/chat v2']}\n")
    result = submit(clusterctl, tmp_path, "backend: slurm\ngpus_per_node: 8\ngpu_memory_gib: 80\n", job,
                    "--dry-run", "--json", check=True)
    script = (Path(json.loads(result.stdout)["dir"]) / "deploy" / "node-000.sh").read_text()
    assert "-m clusterctl.deploy.adapters --null --run-model " in script
    assert "--name r1-math --gpus-per-node 8 --adapter 'chat=/shared/adapters/chat v2'" in script
    assert '--model "${lora_args[0]}"' in script and '"${lora_args[@]:2}"' in script
    assert '--served-model-name "${lora_args[1]}"' in script
    bad = submit(clusterctl, tmp_path, "backend: slurm\ngpus_per_node: 8\ngpu_memory_gib: 80\n",
                 job.replace("'chat=/shared/adapters/chat v2'", "chat"), "--dry-run")
    assert bad.returncode == 2 and "expected NAME=PATH" in bad.stderr


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A peft adapter with random (non-zero) factors on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(out)
    return out


def greedy_reference(base: Path, adapter: Path, ids: list[int], n: int) -> list[int]:
    """transformers + peft greedy tokens, stopping at the first near-tie (bf16 serving may pick either)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    context, out = torch.tensor([ids]), []
    for _ in range(n):
        with torch.no_grad():
            top2 = torch.topk(model(context).logits[0, -1], 2)
        if float(top2.values[0] - top2.values[1]) < 0.01:
            break
        out.append(int(top2.indices[0]))
        context = torch.cat([context, top2.indices[:1].view(1, 1)], dim=1)
    return out


def request(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as reply:
        return json.loads(reply.read())


def complete(url: str, model: str, ids: list[int]) -> list[int]:
    body = {"model": model, "prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    return request(url + "/v1/completions", body)["choices"][0]["token_ids"]


@pytest.mark.slow
def test_two_lora_runs_adapters_served_by_name_beside_the_base(clusterctl, tmp_path, tiny_llama):
    """Two LoRA runs (SFT + merge), then `clusterctl deploy B --adapter math=run:A --adapter extra=PATH`: one vLLM
    server answers as the base, B's own adapter, A's and a folder's, each as transformers + peft; health asks each."""
    cluster = f"backend: local\nports: {{vllm: {free_port()}}}\n"
    extra = make_adapter(tiny_llama, tmp_path / "extra", seed=1)

    def lora_run(seed: int) -> dict:
        job = (f"model: {tiny_llama}\nsft: {{nodes: 1, max_length: 128, micro_batch: 1, grad_accum: 1, max_steps: 2, "
               f"save_steps: 2, lr: 0.02, seed: {seed}, offload_optimizer: false, offload_param: false, method: lora, "
               "lora: {rank: 8, alpha: 16}}\ndeploy: {served_model_name: tiny-lora, max_model_len: 256}\n")
        run = json.loads(submit(clusterctl, tmp_path, cluster, job, "--stages", "sft,convert", "--json",
                                check=True).stdout)
        return json.loads(clusterctl("status", run["run"], "--json").stdout)["stages"]["convert"]["output"]

    first, second = lora_run(1), lora_run(2)
    runs = {Path(merged).parents[1].name: merged for merged in (first, second)}
    assert (Path(f"{first}-adapter") / "adapter_model.safetensors").read_bytes() != \
        (Path(f"{second}-adapter") / "adapter_model.safetensors").read_bytes()
    a, b = runs
    deployed = clusterctl("deploy", b, "--adapter", f"math=run:{a}", "--adapter", f"extra={extra}", "--json")
    run = json.loads(deployed.stdout)
    try:
        assert "PASS  POST /v1/chat/completions" in deployed.stderr, deployed.stderr[-3000:]
        endpoint = json.loads((Path(run["dir"]) / "state" / "deploy" / "endpoint.json").read_text())
        assert endpoint["model"] == "tiny-lora"
        health = json.loads(clusterctl("health", run["run"], "--json", "--timeout", "120").stdout)
        assert health["ok"] and health["models"] == {name: True for name in
                                                     ("tiny-lora", "tiny-lora-base", "math", "extra")}, health
        text = clusterctl("health", run["run"], "--timeout", "120").stdout
        assert "PASS  POST /v1/chat/completions (math)" in text and "(tiny-lora-base)" in text, text
        compared, differs = 0, False                      # each adapter's greedy tokens are transformers + peft's
        for ids in ([1, 50, 60, 70, 80, 90], [1, 200, 17, 300], [1, 5, 400, 33, 120, 77, 9]):
            base = complete(endpoint["url"], "tiny-lora-base", ids)
            for name, adapter in (("tiny-lora", Path(f"{second}-adapter")), ("math", Path(f"{first}-adapter")),
                                  ("extra", extra)):
                want = greedy_reference(tiny_llama, adapter, ids, 16)
                got = complete(endpoint["url"], name, ids)
                assert got[:len(want)] == want, (name, got, want)
                compared += len(want)
                differs |= got != base
        assert compared >= 18 and differs, compared
    finally:
        clusterctl("cancel", run["run"])
    assert processes_with_env(f"RUN_DIR={run['dir']}") == []
