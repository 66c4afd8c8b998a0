"""Rendering: golden files per backend and node count, every script valid bash, and hostile
paths and values that reach the shell as data, never as code."""
import difflib
import os
import re
import subprocess
from pathlib import Path

import pytest

from clusterctl.backends.base import backend_for
from clusterctl.config import load_cluster, load_job
from clusterctl.render import render_run
from clusterctl.run import Run

GOLDEN = Path(__file__).parent / "golden"
REFRESH = "CLUSTERCTL_REFRESH_GOLDEN=1 python -m pytest tests/spine/test_render.py"
CLUSTERS = {
    "ssh": "backend: ssh\nhosts: ['node[01-32]']\ngpus_per_node: 8\npython: /opt/clusterctl/bin/python\n"
           "interface: ib0\nenv: {NCCL_SOCKET_IFNAME: ib0, NCCL_IB_HCA: mlx5}\n"
           "setup: {all: ['source /opt/clusterctl/bin/activate'], sft: ['module load cuda/12.4']}\n",
    "slurm": "backend: slurm\ngpus_per_node: 8\npython: /opt/clusterctl/bin/python\ninterface: ib0\n"
             "slurm: {partition: gpu, account: team, time: '7-00:00:00'}\nenv: {NCCL_SOCKET_IFNAME: ib0}\n"
             "setup: {all: ['source /opt/clusterctl/bin/activate']}\n",
}
JOB = ("name: golden\nmodel: /models/DeepSeek-V3-bf16\ndata: /data/train.jsonl\n"
       "sft: {sequence_parallel: 4, max_length: 32768}\ndeploy: {nodes: 4, tensor_parallel: 8, pipeline_parallel: 4}\n")


def render(tmp_path, backend: str, nodes: int, *, stages=("sft", "convert", "deploy"),
           engine: str = "clusterctl") -> dict[str, str]:
    (tmp_path / "cluster.yaml").write_text(CLUSTERS[backend])
    (tmp_path / "job.yaml").write_text(JOB + f"engine: {engine}\n")
    cluster = load_cluster(str(tmp_path / "cluster.yaml"))
    cluster.source = "/etc/clusterctl/cluster.yaml"
    job = load_job(str(tmp_path / "job.yaml"), sft_nodes=nodes, cluster=cluster, check_paths=False)
    run = Run(f"/shared/runs/20260101-000000-{backend}{nodes}")
    return render_run(run, list(stages), cluster=cluster, job=job, backend=backend_for(cluster),
                      master_port=15000, overrides={})


def kept_in_golden(name: str, nodes: int) -> bool:
    """Golden copies of what --nodes changes: the SFT files at every node count (for 32 nodes only
    nodes 0, 1 and 31; test_middle_nodes_differ_from_node_1_only_in_rank checks the rest); convert and
    deploy, whose node counts come from the job spec, once (at 4 nodes)."""
    rank = re.fullmatch(r"sft/node-(\d{3})\.sh", name)
    if not name.startswith("sft/"):
        return nodes == 4
    return nodes < 32 or not rank or int(rank.group(1)) in (0, 1, nodes - 1)


def assert_golden(folder: Path, files: dict[str, str]) -> None:
    if os.environ.get("CLUSTERCTL_REFRESH_GOLDEN"):
        for old in folder.rglob("*"):
            if old.is_file():
                old.unlink()
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
    expected = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}
    problems = []
    for name in sorted(set(files) | set(expected)):
        if files.get(name) != expected.get(name):
            diff = difflib.unified_diff((expected.get(name) or "").splitlines(), (files.get(name) or "").splitlines(),
                                        f"golden/{folder.name}/{name}", "rendered", lineterm="")
            problems.append("\n".join(diff))
    assert not problems, "rendered files differ from the golden files:\n" + "\n".join(problems) + \
        f"\nIf the change is intended, refresh them: {REFRESH}"


@pytest.mark.parametrize("backend", ["ssh", "slurm"])
@pytest.mark.parametrize("nodes", [1, 2, 4, 32])
def test_golden_files(tmp_path, backend, nodes):
    files = {k: v for k, v in render(tmp_path, backend, nodes).items() if kept_in_golden(k, nodes)}
    assert_golden(GOLDEN / f"{backend}-{nodes}", files)


@pytest.mark.parametrize("backend", ["ssh", "slurm"])
def test_golden_files_of_the_xtuner_engine(tmp_path, backend):
    """engine: xtuner renders the recipe's own launch (not run in CI: it needs the recipe's env)."""
    files = render(tmp_path, backend, 4, stages=("sft", "convert"), engine="xtuner")
    assert 'xtuner" train "$STAGE_DIR/xtuner_config.py"' in files["sft/node-002.sh"]
    config = files.pop("sft/xtuner_config.py")   # its own golden test: tests/training/test_xtuner.py
    assert '"/models/DeepSeek-V3-bf16"' in config and "sequence_parallel_size = 4" in config
    assert_golden(GOLDEN / f"{backend}-4-xtuner", files)


@pytest.mark.parametrize("backend", ["ssh", "slurm"])
def test_middle_nodes_differ_from_node_1_only_in_rank(tmp_path, backend):
    files = render(tmp_path, backend, 32)
    hosts = [f"node{i:02d}" for i in range(1, 33)]
    for rank in range(2, 31):
        expected = files["sft/node-001.sh"].replace("node 1 of 32", f"node {rank} of 32") \
            .replace("node-001.sh", f"node-{rank:03d}.sh").replace("NODE_RANK=1\n", f"NODE_RANK={rank}\n")
        if backend == "ssh":
            expected = expected.replace(f"# on {hosts[1]}", f"# on {hosts[rank]}")
        else:
            expected = expected.replace("# on node 1", f"# on node {rank}")
        assert files[f"sft/node-{rank:03d}.sh"] == expected, rank


@pytest.mark.parametrize("backend", ["ssh", "slurm"])
def test_32_node_scripts_are_valid_bash_with_ranks_0_to_31(tmp_path, backend):
    files = render(tmp_path, backend, 32)
    ranks = []
    for rank in range(32):
        text = files[f"sft/node-{rank:03d}.sh"]
        ranks.append(int(next(line for line in text.splitlines() if line.startswith("export NODE_RANK=")).split("=")[1]))
        assert "export NNODES=32" in text and "export NPROC_PER_NODE=8" in text
    assert ranks == list(range(32))
    for name, text in files.items():
        if name.endswith((".sh", ".sbatch")):
            result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
            assert result.returncode == 0, f"{name}: {result.stderr}"


def test_every_script_starts_with_a_header_saying_how_to_run_it(tmp_path):
    for name, text in render(tmp_path, "ssh", 2).items():
        if name.endswith((".sh", ".sbatch")):
            lines = text.splitlines()
            assert lines[0] == "#!/usr/bin/env bash", name
            assert lines[1].startswith("# Generated by clusterctl"), name
            assert any(line.startswith("# Run by hand:") for line in lines[:6]), name


HOSTILE = "we ird 'q' \"dq\" ; $(touch PWNED) `touch PWNED2` \n line2 \\ $HOME"


def test_hostile_paths_and_values_reach_the_shell_as_data(tmp_path):
    """A run folder, a checkpoint path and an env value full of shell syntax: the node script runs,
    passes each byte for byte, and executes nothing it should not."""
    runs = tmp_path / HOSTILE
    checkpoint = runs / ("ckpt " + HOSTILE)
    checkpoint.mkdir(parents=True)
    (tmp_path / "cluster.yaml").write_text(
        "env:\n  WEIRD: " + repr(HOSTILE).replace("\\\\", "\\\\") + "\n"
        "setup:\n  convert: ['printenv WEIRD > \"$STATE_DIR/weird.txt\"; printf %s \"$RUN_DIR\" > \"$STATE_DIR/rundir.txt\"']\n")
    import yaml
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({
        "env": {"WEIRD": HOSTILE},
        "setup": {"convert": ['printenv WEIRD > "$STATE_DIR/weird.txt"; printf %s "$RUN_DIR" > "$STATE_DIR/rundir.txt"']}}))
    cluster = load_cluster(str(tmp_path / "cluster.yaml"))
    job = load_job(None, sft_nodes=None, cluster=cluster)
    run = Run(runs / "20260101-000000-q")
    from clusterctl.render import write_files
    files = render_run(run, ["convert"], cluster=cluster, job=job, backend=backend_for(cluster),
                       master_port=15000, overrides={"checkpoint": str(checkpoint)})
    write_files(run, files)
    result = subprocess.run(["bash", str(run.node_script("convert", 0))], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert not list(tmp_path.rglob("PWNED*")) and not Path("PWNED").exists()
    state = run.state_dir("convert")
    assert (state / "weird.txt").read_text() == HOSTILE + "\n"
    assert (state / "rundir.txt").read_text() == str(run.dir)
    assert (state / "node-000.exit").read_text().strip() == str(result.returncode)
    # The converter got the checkpoint path intact (it refuses the empty folder by that name).
    assert result.returncode != 0 and str(checkpoint) in result.stdout + result.stderr
