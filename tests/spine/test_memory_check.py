"""submit refuses an SFT job the memory planner says cannot fit, with the fix, unless forced."""
import json
import shutil
from pathlib import Path

MODELS = Path(__file__).parents[1] / "data" / "models"


def write_job(tmp_path, micro_batch: int) -> Path:
    """The recipe's setting with the routed experts fused (expert_groups 1): micro-batch 2 does not fit."""
    model = tmp_path / "deepseek-v3"
    shutil.copytree(MODELS / "deepseek-v3", model)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "cluster.yaml").write_text("backend: slurm\ngpus_per_node: 8\ngpu_memory_gib: 80\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {model}\ndata: train.jsonl\nsft: {{nodes: 32, sequence_parallel: 4, max_length: 32768,"
                   f" micro_batch: {micro_batch}, offload_optimizer: true, offload_param: true, expert_groups: 1}}\n")
    return job


def test_a_job_that_cannot_fit_is_refused_with_the_smallest_fix(clusterctl, tmp_path):
    job = write_job(tmp_path, micro_batch=2)
    result = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run",
                        check=False)
    assert result.returncode == 2
    assert "GiB of GPU per GPU but has 80 GiB" in result.stderr
    assert "fix: set sft.micro_batch: 1 in the job spec (or --set sft.micro_batch=1)" in result.stderr
    assert "--micro-batch" not in result.stderr and "--force" in result.stderr   # submit has no plan flags
    assert not (tmp_path / "runs").exists()
    forced = clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run",
                        "--force", "--json")
    assert Path(json.loads(forced.stdout)["dir"], "sft", "job.sbatch").exists()


def test_the_fitting_job_passes(clusterctl, tmp_path):
    job = write_job(tmp_path, micro_batch=1)
    clusterctl("submit", "sft", "--cluster", tmp_path / "cluster.yaml", "--job", job, "--dry-run")
