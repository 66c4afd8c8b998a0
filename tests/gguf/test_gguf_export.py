"""`clusterctl export gguf` and deploy.engine: llamacpp without llama.cpp: what is refused before anything
runs (by name), the rendered deploy script, the Ollama Modelfile and the converter's pre-tokenizer fallback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.runs import as_submitted

from tests.gguf.conftest import dry_run


def test_bad_inputs_are_refused_by_name(clusterctl, tmp_path):
    run = dry_run(clusterctl, tmp_path)
    unknown = clusterctl("export", "gguf", run.id, "--type", "q3", check=False)
    assert unknown.returncode == 2 and unknown.stderr.startswith("clusterctl: error: unknown GGUF type 'q3'")
    assert "q4_k_m" in unknown.stderr
    pending = clusterctl("export", "gguf", run.id, check=False)
    assert pending.returncode == 2 and "clusterctl: error: " in pending.stderr, pending.stderr
    assert "has no completed convert stage" in pending.stderr and f"clusterctl convert {run.id}" in pending.stderr
    assert "Traceback" not in pending.stderr + unknown.stderr
    as_submitted(run.dir, state="COMPLETED")
    run.update(lambda data: data["stages"]["convert"].update(output=str(tmp_path / "half")))
    (tmp_path / "half").mkdir()
    half = clusterctl("export", "gguf", run.id, check=False)
    assert half.returncode == 2 and "is not a complete model folder (no clusterctl-complete.json)" in half.stderr
    assert not (run.dir / "export").exists()


@pytest.mark.parametrize("deploy, where, message", [
    ("{engine: llamacpp, nodes: 2}", "deploy.nodes", "llama-server serves from one node, not 2"),
    ("{engine: llamacpp, lora: adapters}", "deploy.lora", "engine llamacpp serves the merged model only"),
    ("{engine: llamacpp, tensor_parallel: 2}", "deploy.tensor_parallel", "tensor_parallel is vLLM's"),
    ("{engine: ollama}", "deploy.engine", "unknown engine 'ollama'"),
    ("{engine: llamacpp, gguf_type: q5}", "deploy.gguf_type", "unknown GGUF type 'q5'"),
])
def test_deploy_engine_combinations_that_cannot_work_are_refused_at_submit(clusterctl, tmp_path, deploy, where,
                                                                          message):
    (tmp_path / "job.yaml").write_text(f"name: tiny\ndeploy: {deploy}\n")
    refused = clusterctl("submit", "sft", "--dry-run", "--job", tmp_path / "job.yaml", check=False)
    assert refused.returncode == 2, refused.stderr
    assert f"job.yaml:2: {where}: {message}" in refused.stderr, refused.stderr


def test_llamacpp_deploy_script_runs_llama_server_on_the_private_address(clusterctl, tmp_path):
    run = dry_run(clusterctl, tmp_path, "name: tiny\ndeploy: {engine: llamacpp, gguf_type: q8_0, "
                  "served_model_name: tiny-r1, api_key_file: ~/key}\n")
    script = run.node_script("deploy", 0).read_text()
    assert "-m clusterctl.deploy.llamacpp --null --model " in script and '--run-dir "$RUN_DIR"' in script
    assert "--type q8_0 --host \"$serve_host\"" in script and 'serve_host="$NODE_IP"' in script
    assert "--api-key-file '~/key'" in script and "vllm serve" not in script and "ray start" not in script
    from clusterctl.deploy.llamacpp import server_argv
    argv = server_argv(Path("/t/llama-server"), Path("/r/export/x-q8_0.gguf"), host="10.0.0.5", port=8000,
                       served_model_name="tiny-r1", ctx_size=0, api_key_file="/k", extra=["--threads", "8"])
    assert argv == ["/t/llama-server", "--model", "/r/export/x-q8_0.gguf", "--host", "10.0.0.5", "--port", "8000",
                    "--no-webui", "--jinja", "--alias", "tiny-r1", "--api-key-file", "/k", "--threads", "8"]


def test_modelfile_follows_the_chat_template_and_stop_tokens(tiny_model, tmp_path):
    from clusterctl.convert.modelfile import go_template, modelfile_text

    text = modelfile_text(tmp_path / "export" / "r-q4_k_m.gguf", tiny_model)
    assert "FROM ./r-q4_k_m.gguf\n" in text
    assert ('TEMPLATE """{{ if .System }}{{ .System }}<｜User｜>{{ else }}<｜User｜>{{ end }}{{ .Prompt }}'
            '<｜Assistant｜>{{ .Response }}"""') in text
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"\nPARAMETER stop "<｜User｜>"\n' in text
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    go, stops = go_template(chatml, "", "<|im_end|>")
    assert go == ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ else }}"
                  "<|im_start|>user\n{{ end }}{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}")
    assert stops == ["<|im_start|>user"]
    assert go_template("{{ raise_exception('no') }}", "", "") == ("", [])


def test_pre_tokenizer_fallback_only_for_gpt2_byte_level(tiny_model, tmp_path):
    from clusterctl.convert.gguf_convert import is_gpt2_pre_tokenizer

    assert is_gpt2_pre_tokenizer(tiny_model / "tokenizer.json")
    other = json.loads((tiny_model / "tokenizer.json").read_text())
    other["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        other["pre_tokenizer"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(other))
    assert not is_gpt2_pre_tokenizer(tmp_path / "tokenizer.json")
