"""Values that used to be accepted at submit and fail hours later on the nodes (or end in a traceback)
are refused at submit with the file, line, field and fix; nothing is written."""
import json
import subprocess
import sys

import pytest

from clusterctl.backends.base import backend_for
from clusterctl.config import load_cluster, load_job
from clusterctl.errors import ConfigError
from clusterctl.hostlist import MAX_HOSTS
from clusterctl.render import render_run
from clusterctl.run import Run


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error_of(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    return str(info.value)


def model(tmp_path, heads=4, layers=3):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_hidden_layers": layers}))
    return folder


def job_error(tmp_path, text, cluster="backend: local\n"):
    job = write(tmp_path, "job.yaml", text)
    return error_of(lambda: load_job(job, cluster=load_cluster(write(tmp_path, "cluster.yaml", cluster))))


def cluster_error(tmp_path, text):
    path = write(tmp_path, "cluster.yaml", text)
    return error_of(lambda: load_cluster(path))


@pytest.mark.parametrize("text, expected", [
    ("sft:\n  lr: -1.0e-5\n", "job.yaml:2: sft.lr: the learning rate must be above 0"),
    ("sft:\n  lr: .nan\n", "job.yaml:2: sft.lr: expected a finite number, got nan"),
    ("sft:\n  epochs: 0\n", "job.yaml:2: sft.epochs: epochs must be above 0"),
    ("sft:\n  max_length: -4\n", "job.yaml:2: sft.max_length: must be at least 1, got -4"),
    ("sft:\n  warmup_ratio: 2\n", "job.yaml:2: sft.warmup_ratio: must be between 0 and 1"),
    ("engine: xtuner\nsft:\n  adam_betas: [0.9]\n", "job.yaml:3: sft.adam_betas: expected two betas in [0, 1)"),
    ("convert:\n  engine: deepspeed\n", "job.yaml:2: convert.engine: unknown engine 'deepspeed'"),
    ("convert:\n  workers: 0\n", "job.yaml:2: convert.workers: must be at least 1, got 0"),
    ("deploy:\n  ready_timeout: -1\n", "job.yaml:2: deploy.ready_timeout: must be at least 1 second"),
    ("deploy:\n  max_model_len: -1\n", "job.yaml:2: deploy.max_model_len: must not be negative"),
    ("name: \"a\\nb\"\n", "job.yaml:1: name: name must be one line"),
])
def test_bad_job_values_are_refused_at_submit(tmp_path, text, expected):
    assert expected in job_error(tmp_path, text)


@pytest.mark.parametrize("text, expected", [
    ("env:\n  OMP-THREADS: '1'\n", "cluster.yaml:2: env.OMP-THREADS: 'OMP-THREADS' is not a valid environment"),
    ("env:\n  é: '1'\n", "'é' is not a valid environment variable name"),
    ("backend: ssh\nhosts: [a, 'b,a']\n", "host 'a' is listed twice"),
    ("ports:\n  vllm: 70000\n", "cluster.yaml:2: ports.vllm: port 70000 is outside 1-65535"),
    ("ports:\n  ray: 0\n", "cluster.yaml:2: ports.ray: port 0 is outside 1-65535"),
    ("ssh:\n  port: -22\n", "cluster.yaml:2: ssh.port: port -22 is outside 1-65535"),
    ("ssh:\n  connect_timeout: -1\n", "cluster.yaml:2: ssh.connect_timeout: must be above 0 seconds"),
    ("backend: ssh\nhosts: ['n[1-1000000]']\n", f"expands to 1000000 names, more than {MAX_HOSTS}"),
    ("gpus_per_node: -8\n", "cluster.yaml:1: gpus_per_node: must not be negative, got -8"),   # not deploy.*
    ("slurm:\n  partition: \"gpu\\n#SBATCH --x\"\n", "cluster.yaml:2: slurm.partition: partition must be one line"),
])
def test_bad_cluster_values_are_refused(tmp_path, text, expected):
    assert expected in cluster_error(tmp_path, text)


def test_a_cluster_file_that_is_not_utf8_is_a_message(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_bytes(b"backend: local\nenv:\n  A: \"\xff\"\n")
    assert f"{path}:3: not UTF-8 text: byte 0xff cannot be decoded" in error_of(lambda: load_cluster(str(path)))


def test_sequence_parallel_must_divide_the_heads_on_cpu_clusters_too(tmp_path):
    folder = model(tmp_path, heads=6)
    write(tmp_path, "data.jsonl", '{"messages": []}\n')
    text = f"model: {folder}\ndata: data.jsonl\nsft:\n  nodes: 4\n  sequence_parallel: 4\n"
    assert "job.yaml:5: sft.sequence_parallel: sequence_parallel 4 does not divide the model's 6 attention heads" \
        in job_error(tmp_path, text)
    # the built-in model has 4 heads and 3 layers: its layouts are checked too
    assert "does not divide the model's 4 attention heads" in job_error(
        tmp_path, "sft:\n  nodes: 3\n  sequence_parallel: 3\n")
    assert "does not divide the model's 4 attention heads" in job_error(
        tmp_path, "deploy:\n  tensor_parallel: 8\n", cluster="gpus_per_node: 8\n")
    assert "(not set in the job spec: tensor_parallel defaults to GPUs per node (8))" in job_error(
        tmp_path, "name: x\n", cluster="gpus_per_node: 8\n")
    assert "larger than the model's 3 layers" in job_error(
        tmp_path, "deploy:\n  nodes: 4\n  tensor_parallel: 1\n  pipeline_parallel: 4\n", cluster="gpus_per_node: 1\n")


def test_force_skips_only_the_memory_check(clusterctl, tmp_path):
    job = write(tmp_path, "job.yaml", "sft:\n  nodes: 2\n  sequence_parallel: 8\n")
    cluster = write(tmp_path, "cluster.yaml", "gpus_per_node: 4\n")
    result = clusterctl("submit", "--cluster", cluster, "--job", job, "--dry-run", "--force", check=False)
    assert result.returncode == 2 and "does not divide the model's 4 attention heads" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "model").mkdir(), "model is not a model folder: it has no config.json"),
    (lambda d: (d / "model").write_text("weights"), "model is not a model folder: it is a file"),
])
def test_the_model_must_be_a_model_folder(tmp_path, make, expected):
    make(tmp_path)
    write(tmp_path, "data.jsonl", '{"messages": []}\n')
    assert expected in job_error(tmp_path, "model: model\ndata: data.jsonl\n")


def test_the_data_must_be_a_non_empty_file(tmp_path):
    model(tmp_path)
    (tmp_path / "folder").mkdir()
    assert "job.yaml:2: data: " in job_error(tmp_path, "model: model\ndata: folder\n")
    assert "is a folder, not a data file" in job_error(tmp_path, "model: model\ndata: folder\n")
    write(tmp_path, "empty.jsonl", "")
    assert "empty.jsonl is empty" in job_error(tmp_path, "model: model\ndata: empty.jsonl\n")


def test_an_api_key_in_extra_args_is_refused_and_nothing_is_written(clusterctl, tmp_path):
    job = write(tmp_path, "job.yaml", "deploy:\n  extra_args: ['--api-key=sk-secret']\n")
    result = clusterctl("submit", "--job", job, "--dry-run", check=False)
    assert result.returncode == 2
    assert "job.yaml:2: deploy.extra_args: an API key on the command line" in result.stderr
    assert "sk-secret" not in result.stderr and not (tmp_path / "runs").exists()


def render_deploy(tmp_path, job_text: str, cluster_text: str = "backend: local\n") -> str:
    cluster = load_cluster(write(tmp_path, "cluster.yaml", cluster_text))
    job = load_job(write(tmp_path, "job.yaml", job_text), cluster=cluster, check_paths=False)
    files = render_run(Run(tmp_path / "runs" / "r"), ["deploy"], cluster=cluster, job=job,
                       backend=backend_for(cluster), master_port=15000, overrides={"model": "/m"})
    return files["deploy/node-000.sh"]


def test_a_tilde_in_the_api_key_file_is_the_nodes_home(tmp_path):
    script = render_deploy(tmp_path, "deploy:\n  api_key_file: '~/keys/vllm key'\n")
    (line,) = [line for line in script.splitlines() if line.startswith("key_file=")]
    out = subprocess.run(["bash", "-c", f'{line}\nprintf %s "$key_file"'], capture_output=True, text=True,
                         env={"HOME": "/home/someone"}, check=True).stdout
    assert out == "/home/someone/keys/vllm key"


def test_the_node_interpreter_is_resolved_on_the_node_after_setup(tmp_path):
    """Without `python:`, a remote node runs the python3 its `setup:` lines put first on PATH (not the
    submitting machine's sys.executable, which the nodes may not have)."""
    venv = tmp_path / "shared-env" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").symlink_to(sys.executable)
    cluster = f"backend: ssh\nhosts: [h1]\nsetup:\n  all: ['PATH={venv}:$PATH']\n"
    script = render_deploy(tmp_path, "name: x\n", cluster)
    assert sys.executable not in script
    header = script.split("NODE_IP=")[0]   # everything up to the first use of the interpreter
    out = subprocess.run(["bash", "-c", header + 'printf "%s %s" "$CLUSTERCTL_PYTHON" "$CLUSTERCTL_BIN"'],
                         capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).stdout
    assert out.splitlines()[-1] == f"{venv}/python3 {venv}"
    configured = render_deploy(tmp_path, "name: x\n", cluster + "python: /opt/env/bin/python\n")
    assert "export CLUSTERCTL_PYTHON=/opt/env/bin/python" in configured and "command -v python3" not in configured


def test_submit_says_which_interpreter_the_nodes_use(clusterctl, tmp_path):
    cluster = write(tmp_path, "cluster.yaml", "backend: ssh\nhosts: [h1, h2]\n")
    result = clusterctl("submit", "--cluster", cluster, "--dry-run", "--stages", "sft")
    assert "node interpreter: python3 on each node's PATH after the setup: lines" in result.stdout
    result = clusterctl("submit", "--dry-run", "--stages", "sft")
    assert f"node interpreter: {sys.executable} (this interpreter: the local backend)" in result.stdout


def test_json_errors_do_not_say_at_at(tmp_path):
    from clusterctl.training.data import line_record

    assert line_record("line 1", b'{"messages": "abc').error == \
        "not JSON: Unterminated string starting at column 14"
    assert line_record("line 1", b"{").error.endswith("at column 2")


def test_an_empty_data_file_is_not_told_to_fix_lines_above(clusterctl, tmp_path):
    write(tmp_path, "empty.jsonl", "")
    result = clusterctl("data", "check", tmp_path / "empty.jsonl", check=False)
    assert result.returncode == 1 and "lines above" not in result.stdout
    assert "NOT OK: the file holds no conversations" in result.stdout


def test_an_unwritable_runs_dir_is_a_message(clusterctl, tmp_path):
    write(tmp_path, "a-file", "")
    result = clusterctl("submit", "--dry-run", "--runs-dir", tmp_path / "a-file" / "runs", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("clusterctl: error: --runs-dir: cannot create the run folder")


def test_doctor_says_which_interpreter_the_nodes_use(clusterctl, tmp_path):
    result = clusterctl("doctor", check=False)   # a busy port elsewhere on the machine may fail a check
    assert f"node scripts run {sys.executable} (this interpreter: the local backend)" in result.stdout
