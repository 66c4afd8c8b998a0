"""`deploy --adapter [NAME=]run:<RUN>` / `deploy.adapters: [run:<RUN>]`: another LoRA run's adapter, checked at
submit (the run exists, its convert stage wrote a whole peft adapter, same base as served, rank vLLM takes) and
rendered as the folder it names; on the node, a model that is not a LoRA merge is served itself by the name."""
import json
from pathlib import Path

import pytest

from clusterctl.atomic import MARKER
from clusterctl.deploy.adapters import Adapter, main, run_adapter
from clusterctl.errors import ConfigError

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 256,
         "vocab_size": 1000, "max_position_embeddings": 2048}


def model_folder(path: Path, **config) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**LLAMA, **config}))
    return path


def convert_output(runs: Path, run_id: str, base: Path | None, *, rank: int = 8, state: str = "COMPLETED",
                   files=("adapter_config.json", "adapter_model.safetensors"), marker: bool = True) -> Path:
    """A run folder whose convert stage wrote `model` (a LoRA merge of `base`; base None: a full-SFT
    conversion) and `model-adapter` holding `files`, as convert/merge.py lays them out."""
    out = runs / run_id / "convert" / "model"
    out.mkdir(parents=True)
    if marker:
        (out / MARKER).write_text(json.dumps({"source": str(base or "/elsewhere"),
                                              **({"adapter": "/x/step-2/adapter"} if base else {})}))
    adapter = Path(f"{out}-adapter")
    adapter.mkdir()
    for name in files:
        (adapter / name).write_text(json.dumps({"r": rank}) if name.endswith(".json") else "weights")
    (runs / run_id / "run.json").write_text(json.dumps(
        {"run": run_id, "backend": "local", "chain": ["convert"], "stages": {"convert": {"state": state, "output": str(out)}}}))
    return out


def test_run_references_are_checked_and_resolved(tmp_path):
    runs, base = tmp_path / "runs", model_folder(tmp_path / "base")
    copy = model_folder(tmp_path / "copy")                      # the same config.json elsewhere: the same base
    other = model_folder(tmp_path / "other", hidden_size=256)
    good = convert_output(runs, "r-good", copy)
    convert_output(runs, "r-running", base, state="RUNNING", marker=False)
    convert_output(runs, "r-full", None)
    convert_output(runs, "r-half", base, files=("adapter_config.json",))
    convert_output(runs, "r-other", other)
    convert_output(runs, "r-wide", base, rank=1024)

    def resolve(text: str) -> Adapter:
        return run_adapter(Adapter.parse(text), base=str(base), runs_dir=runs, where="--adapter x: deploy.adapters")

    assert resolve("math=run:r-good") == Adapter("math", f"{good}-adapter")
    assert resolve("run:r-good").name == "r-good"                         # served as the run id
    assert resolve(f"run:{runs / 'r-good'}/").name == "r-good"            # a run folder's path too
    for text, message, fix in (
            ("run:nope", "adapter 'nope': no run 'nope'", "--runs-dir"),
            ("run:r-running", "run r-running has no completed convert stage (RUNNING", "clusterctl convert r-running"),
            ("run:r-full", "run r-full is not a LoRA run", "sft.method: lora or qlora"),
            ("run:r-half", "adapter_model.safetensors missing", "clusterctl convert r-half"),
            ("run:r-other", f"run r-other trained on {tmp_path / 'other'}, but this deploy serves the base {base}",
             "the base model they were trained on"),
            ("run:r-wide", "run r-wide's rank 1024 is above vLLM's limit 512", "deploy.lora: merged")):
        with pytest.raises(ConfigError) as refused:
            resolve(text)
        assert message in str(refused.value) and fix in str(refused.value), str(refused.value)
        assert "--adapter x: deploy.adapters" in str(refused.value)
    for text in ("chat", "run:", "=run:r-good"):
        with pytest.raises(ConfigError, match="expected NAME=PATH, run:<RUN> or NAME=run:<RUN>"):
            Adapter.parse(text)


def test_deploy_refuses_bad_adapters_at_submit_naming_the_flag(clusterctl, tmp_path):
    base = model_folder(tmp_path / "base")
    convert_output(tmp_path / "runs", "r-full", None)
    (tmp_path / "cluster.yaml").write_text("backend: local\n")
    (tmp_path / "job.yaml").write_text(f"model: {base}\n")
    deploy = ("deploy", "--model", base, "--cluster", tmp_path / "cluster.yaml", "--job", tmp_path / "job.yaml")
    refused = clusterctl(*deploy, "--adapter", "run:nope", check=False)
    assert refused.returncode == 2 and "clusterctl: error: --adapter run:nope: deploy.adapters: adapter 'nope': " \
        "no run 'nope'" in refused.stderr, refused.stderr
    refused = clusterctl(*deploy, "--adapter", "a=run:nope", "--adapter", "math=run:r-full", check=False)
    assert "--adapter a=run:nope --adapter math=run:r-full: deploy.adapters" in refused.stderr, refused.stderr
    refused = clusterctl(*deploy, "--adapter", "chat", check=False)
    assert refused.returncode == 2 and "--adapter chat: deploy.adapters: expected NAME=PATH" in refused.stderr
    assert not list((tmp_path / "runs").glob("*/deploy")), "nothing was rendered"


def test_job_spec_run_adapters_are_rendered_as_folders(clusterctl, tmp_path):
    base = model_folder(tmp_path / "base")
    good = convert_output(tmp_path / "runs", "r-good", base)
    (tmp_path / "cluster.yaml").write_text("backend: local\n")
    (tmp_path / "job.yaml").write_text(f"model: {base}\ndeploy: {{served_model_name: tiny, lora: adapters, "
                                       "adapters: ['math=run:r-good', 'run:r-good']}\n")
    result = clusterctl("submit", "sft", "--stages", "deploy", "--dry-run", "--json", "--cluster",
                        tmp_path / "cluster.yaml", "--job", tmp_path / "job.yaml")
    run_dir = Path(json.loads(result.stdout)["dir"])
    script = (run_dir / "deploy" / "node-000.sh").read_text()
    assert f"--adapter math={good}-adapter --adapter r-good={good}-adapter" in script
    assert "run:" not in script
    assert f"math={good}-adapter" in (run_dir / "job.yaml").read_text()      # the snapshot holds the folders
    trains = (tmp_path / "job.yaml").read_text().replace("deploy:", "sft: {method: full}\ndeploy:")
    (tmp_path / "job.yaml").write_text(trains)
    refused = clusterctl("submit", "sft", "--stages", "sft,convert,deploy", "--dry-run", "--cluster",
                         tmp_path / "cluster.yaml", "--job", tmp_path / "job.yaml", check=False)
    assert refused.returncode == 2 and "job.yaml:3: deploy.adapters: other runs' adapters are served on their " \
        "base model, which this run's sft stage replaces" in refused.stderr, refused.stderr


def test_node_side_serves_a_lora_merge_as_base_plus_adapter_and_any_other_model_as_itself(tmp_path, capsys):
    base = model_folder(tmp_path / "base")
    merged = convert_output(tmp_path / "runs", "r1", base)
    extra = Path(f"{merged}-adapter")
    assert main(["--run-model", str(merged), "--name", "tiny", "--adapter", f"math={extra}"]) == 0
    assert capsys.readouterr().out.split() == [
        str(base), "tiny-base", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--lora-modules",
        f"tiny={merged}-adapter", f"math={extra}"]
    assert main(["--run-model", str(base), "--name", "tiny", "--adapter", f"math={extra}"]) == 0
    assert capsys.readouterr().out.split() == [
        str(base), "tiny", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules",
        f"math={extra}"]
    wide = convert_output(tmp_path / "runs", "r2", base, rank=1024)
    assert main(["--run-model", str(base), "--adapter", f"wide={wide}-adapter"]) == 2
    assert "LoRA rank 1024 is above vLLM's limit 512" in capsys.readouterr().err
