"""Command-line overrides (--set, --set-cluster, --nodes) are written into the spec before it is
checked: the same refusals as the file, errors that name the flag, and the run folder records the result."""
import json
from pathlib import Path

import pytest
import yaml

from clusterctl.config import load_cluster, load_job
from clusterctl.errors import ConfigError
from clusterctl.schema import parse_assignment

SSH4 = "backend: ssh\nhosts: ['node[1-4]']\ngpus_per_node: 8\n"
SLURM = "backend: slurm\ngpus_per_node: 8\n"


def write(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def model_folder(tmp_path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 64, "num_hidden_layers": 61}))
    return model


def test_overrides_land_in_the_run_folder_and_the_dry_run_says_so(clusterctl, tmp_path):
    cluster = write(tmp_path, "cluster.yaml", SSH4)
    result = clusterctl("submit", "--cluster", cluster, "--dry-run", "--set", "sft.lr=1e-5", "--set", "deploy.nodes=2",
                        "--set", "deploy.tensor_parallel=4", "--set", "name=tuned",
                        "--set-cluster", "slurm.partition=debug", "--set-cluster", "env.NCCL_DEBUG=INFO")
    assert "--set: sft.lr=1e-5, deploy.nodes=2, deploy.tensor_parallel=4, name=tuned" in result.stdout
    assert "--set-cluster: slurm.partition=debug, env.NCCL_DEBUG=INFO" in result.stdout
    (run,) = (tmp_path / "runs").iterdir()
    job = yaml.safe_load((run / "job.yaml").read_text())
    assert (job["sft"]["lr"], job["deploy"]["nodes"], job["deploy"]["tensor_parallel"], job["name"]) == \
        (1e-5, 2, 4, "tuned")
    cluster_snapshot = yaml.safe_load((run / "cluster.yaml").read_text())
    assert cluster_snapshot["slurm"]["partition"] == "debug" and cluster_snapshot["env"]["NCCL_DEBUG"] == "INFO"
    assert json.loads((run / "sft" / "train.json").read_text())["lr"] == 1e-5
    assert len(list((run / "deploy").glob("node-*.sh"))) == 2
    assert json.loads((run / "run.json").read_text())["set"]["--set-cluster"] == ["slurm.partition=debug",
                                                                                  "env.NCCL_DEBUG=INFO"]


@pytest.mark.parametrize("assignment, expected", [
    ("sft.lrr=1", "--set sft.lrr=1: sft.lrr: unknown key 'lrr'\n  fix: remove it or use one of: adam_betas,"),
    ("sft.lr=fast", "--set sft.lr=fast: sft.lr: expected a number, got str 'fast'"),
    ("sft.lr=-1", "--set sft.lr=-1: sft.lr: the learning rate must be above 0"),
    ("deploy.nodes=0", "--set deploy.nodes=0: deploy.nodes: a stage needs at least 1 node"),
    ("nonsense.key=1", "--set nonsense.key=1: nonsense: unknown key 'nonsense'"),
    ("name.first=1", "--set name.first=1: name holds"),
    ("sft.lr", "--set: expected KEY=VALUE with a dotted KEY, got 'sft.lr'"),
    ("sft..lr=1", "expected KEY=VALUE with a dotted KEY"),
    ("sft.lr=[1", "--set sft.lr=[1: the value is not valid YAML"),
])
def test_a_bad_override_is_refused_naming_the_flag(tmp_path, assignment, expected):
    with pytest.raises(ConfigError) as info:
        load_job(None, cluster=load_cluster(None), overrides=[parse_assignment(assignment, "--set")])
    assert expected in str(info.value)


def test_cluster_overrides_without_a_cluster_file(tmp_path):
    cluster = load_cluster(None, [parse_assignment("gpus_per_node=2", "--set-cluster")])
    assert cluster.gpus_per_node == 2 and cluster.backend == "local"
    with pytest.raises(ConfigError) as info:
        load_cluster(None, [parse_assignment("slurm.partitio=x", "--set-cluster")])
    assert "--set-cluster slurm.partitio=x: slurm.partitio: unknown key 'partitio'" in str(info.value)
    assert "use one of: account, extra_options, max_restarts, partition," in str(info.value)


def test_values_are_read_as_yaml(tmp_path):
    job = load_job(None, cluster=load_cluster(None), overrides=[
        parse_assignment(text, "--set") for text in ("sft.packing=true", "deploy.extra_args=[--enforce-eager]",
                                                     "sft.adam_betas=[0.8, 0.95]", "deploy.served_model_name=")])
    assert job.sft.packing is True and job.deploy.extra_args == ["--enforce-eager"]
    assert job.sft.adam_betas == [0.8, 0.95] and job.deploy.served_model_name == ""


def test_exponent_floats_are_numbers_in_files_too(tmp_path):
    job = write(tmp_path, "job.yaml", "sft:\n  lr: 1e-5\n")   # YAML 1.1 alone would read a string
    assert load_job(str(job), cluster=load_cluster(None)).sft.lr == 1e-5


def test_deploy_nodes_beyond_the_ssh_hosts_is_refused_before_rendering(clusterctl, tmp_path):
    cluster = write(tmp_path, "cluster.yaml", SSH4)
    job = write(tmp_path, "job.yaml", "deploy: {tensor_parallel: 4}\n")
    result = clusterctl("deploy", "--model", model_folder(tmp_path), "--nodes", "8", "--cluster", cluster,
                        "--job", job, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("clusterctl: error: --nodes 8: deploy.nodes: deploy asks for 8 nodes but")
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_deploy_nodes_that_leave_gpus_missing_is_refused_like_the_file(clusterctl, tmp_path):
    cluster = write(tmp_path, "cluster.yaml", SLURM)
    job = write(tmp_path, "job.yaml", "deploy: {nodes: 4, tensor_parallel: 8, pipeline_parallel: 4}\n")
    model = model_folder(tmp_path)
    result = clusterctl("deploy", "--model", model, "--nodes", "2", "--cluster", cluster, "--job", job, check=False)
    assert result.returncode == 2, result.stderr
    assert "tensor_parallel x pipeline_parallel = 32 GPUs, but 2 nodes x 8 GPUs = 16" in result.stderr
    assert not (tmp_path / "runs").exists()   # nothing rendered, nothing handed to sbatch
    same_in_file = write(tmp_path, "job2.yaml", "deploy: {nodes: 2, tensor_parallel: 8, pipeline_parallel: 4}\n")
    result = clusterctl("deploy", "--model", model, "--cluster", cluster, "--job", same_in_file, check=False)
    assert "tensor_parallel x pipeline_parallel = 32 GPUs" in result.stderr


def test_stage_commands_take_set_too(clusterctl, tmp_path):
    cluster = write(tmp_path, "cluster.yaml", SSH4)
    result = clusterctl("deploy", "--model", model_folder(tmp_path), "--cluster", cluster,
                        "--set", "deploy.ready_timeout=-5", check=False)
    assert result.returncode == 2
    assert "--set deploy.ready_timeout=-5: deploy.ready_timeout: must be at least 1 second" in result.stderr
