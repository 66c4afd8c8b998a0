"""Bad input gets one clear message naming the file, line, field and fix, before anything is rendered."""
import pytest

from clusterctl.config import load_cluster, load_job
from clusterctl.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(call):
    with pytest.raises(ConfigError) as info:
        call()
    return str(info.value)


def test_unknown_cluster_key_names_file_line_and_choices(tmp_path):
    path = write(tmp_path, "cluster.yaml", "backend: ssh\nhosts: [a]\ngpu_per_node: 8\n")
    message = error_of(lambda: load_cluster(path))
    assert f"{path}:3: gpu_per_node: unknown key 'gpu_per_node'" in message
    assert "gpus_per_node" in message  # the fix lists the real keys


def test_wrong_type_in_nested_section(tmp_path):
    path = write(tmp_path, "cluster.yaml", "backend: slurm\nslurm:\n  partition: gpu\n  max_restarts: three\n")
    message = error_of(lambda: load_cluster(path))
    assert f"{path}:4: slurm.max_restarts: expected int, got str 'three'" in message


def test_unknown_backend_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "cluster.yaml", "backend: kubernetes\n")
    assert "use one of: local, ssh, slurm" in error_of(lambda: load_cluster(path))


def test_more_nodes_than_hosts(tmp_path):
    cluster = load_cluster(write(tmp_path, "cluster.yaml", "backend: ssh\nhosts: ['node[1-4]']\n"))
    job = write(tmp_path, "job.yaml", "sft:\n  nodes: 2\n")
    message = error_of(lambda: load_job(job, sft_nodes=8, cluster=cluster))
    assert "sft asks for 8 nodes but" in message and "lists 4 hosts" in message
    assert "fix: add hosts to cluster.yaml or lower the node count (--nodes)" in message


def test_missing_model_and_data_paths(tmp_path):
    cluster = load_cluster(None)
    job = write(tmp_path, "job.yaml", "model: ./nowhere\ndata: data.jsonl\n")
    message = error_of(lambda: load_job(job, sft_nodes=None, cluster=cluster))
    assert f"{job}:1: model" in message and "nowhere does not exist" in message
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "config.json").write_text("{}")
    message = error_of(lambda: load_job(job, sft_nodes=None, cluster=cluster))
    assert f"{job}:2: data" in message and "data.jsonl does not exist" in message


def test_training_fields_are_checked_by_the_trainer_schema(tmp_path):
    job = write(tmp_path, "job.yaml", "sft:\n  nodes: 2\n  zero_stage: 1\n")
    assert f"{job}:3: sft.zero_stage: ZeRO stage must be 2 or 3" in error_of(
        lambda: load_job(job, sft_nodes=None, cluster=load_cluster(None)))
    job = write(tmp_path, "job.yaml", "sft:\n  learning_rate: 0.1\n")
    assert f"{job}:2: sft.learning_rate: unknown key" in error_of(
        lambda: load_job(job, sft_nodes=None, cluster=load_cluster(None)))


def test_sequence_parallel_must_divide_the_world(tmp_path):
    cluster = load_cluster(write(tmp_path, "cluster.yaml", "gpus_per_node: 8\n"))
    job = write(tmp_path, "job.yaml", "sft:\n  sequence_parallel: 3\n")
    assert "does not divide the world size 16" in error_of(lambda: load_job(job, sft_nodes=2, cluster=cluster))


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "cluster.yaml", "backend: local\nenv: {A: 1\n")
    assert f"{path}:3" in error_of(lambda: load_cluster(path))


def test_cli_prints_the_message_without_a_traceback(clusterctl, tmp_path):
    path = write(tmp_path, "cluster.yaml", "backend: ssh\nhosts: [a]\nbogus: 1\n")
    result = clusterctl("submit", "sft", "--cluster", path, "--dry-run", check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"clusterctl: error: {path}:3: bogus: unknown key")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing rendered


def test_deploy_tensor_parallel_must_divide_the_attention_heads(tmp_path):
    import shutil
    from pathlib import Path
    model = tmp_path / "deepseek-v3"
    shutil.copytree(Path(__file__).parents[1] / "data" / "models" / "deepseek-v3", model)
    (tmp_path / "train.jsonl").write_text("[]")
    cluster = load_cluster(write(tmp_path, "cluster.yaml", "backend: slurm\ngpus_per_node: 8\n"))
    job = write(tmp_path, "job.yaml", f"model: {model}\ndata: train.jsonl\n"
                                      "deploy:\n  nodes: 4\n  tensor_parallel: 3\n  pipeline_parallel: 4\n")
    message = error_of(lambda: load_job(job, sft_nodes=None, cluster=cluster))
    assert f"{job}:5: deploy.tensor_parallel" in message and "128" in message
    job = write(tmp_path, "job.yaml", f"model: {model}\ndata: train.jsonl\n"
                                      "deploy:\n  nodes: 4\n  tensor_parallel: 8\n  pipeline_parallel: 4\n")
    assert load_job(job, sft_nodes=None, cluster=cluster).deploy.pipeline_parallel == 4
