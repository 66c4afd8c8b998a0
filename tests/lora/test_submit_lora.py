"""submit checks a LoRA job's memory as for full SFT (671B LoRA on 3 x 8 x 80 GiB: refused without parameter
offload, with that fix; accepted with it) and renders the method into train.json."""
import json
import shutil
from pathlib import Path

MODELS = Path(__file__).parents[1] / "data" / "models"


def write_job(tmp_path, offload: bool) -> Path:
    model = tmp_path / "deepseek-v3"
    shutil.copytree(MODELS / "deepseek-v3", model)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "cluster.yaml").write_text("backend: slurm\ngpus_per_node: 8\ngpu_memory_gib: 80\n"
                                           "host_memory_gib: 2048\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {model}\ndata: train.jsonl\nsft:\n  nodes: 3\n  max_length: 4096\n  method: lora\n"
                   f"  lora: {{rank: 8, alpha: 16, targets: [all]}}\n"
                   f"  offload_optimizer: {str(offload).lower()}\n  offload_param: {str(offload).lower()}\n")
    return job


def test_671b_lora_job_is_refused_without_offload_and_accepted_with_it(clusterctl, tmp_path):
    refused = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", write_job(tmp_path, False),
                         "--dry-run", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "set sft.offload_optimizer: true, sft.offload_param: true" in refused.stderr

    shutil.rmtree(tmp_path / "deepseek-v3")
    job = write_job(tmp_path, True)
    result = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run", "--json")
    train = json.loads(Path(json.loads(result.stdout)["dir"], "sft", "train.json").read_text())
    assert train["method"] == "lora" and train["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                                                            "targets": ["all"]}


def test_unknown_method_and_bad_lora_values_are_named_by_line(clusterctl, tmp_path):
    job = write_job(tmp_path, True)
    bad = job.read_text().replace("method: lora", "method: dora").replace("rank: 8", "rank: 0")
    job.write_text(bad)
    result = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run", check=False)
    assert result.returncode == 2 and "job.yaml:7: sft.lora.rank" in result.stderr, result.stderr
    job.write_text(bad.replace("rank: 0", "rank: 8"))
    result = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run", check=False)
    assert result.returncode == 2 and "sft.method" in result.stderr and "full, lora, qlora" in result.stderr
