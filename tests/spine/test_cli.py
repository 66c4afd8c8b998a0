"""The orchestrator side of the CLI: light imports, dry runs, status and logs of a run folder."""
import json
import subprocess
import sys

from clusterctl.run import Run

HEAVY = ("torch", "transformers", "deepspeed", "vllm", "ray")


def test_help_and_dry_run_import_no_heavy_stack(tmp_path):
    script = (
        "import sys\n"
        "from clusterctl.cli import cli\n"
        "for args in (['--help'], ['submit', '--help'], ['submit', 'sft', '--nodes', '4', '--dry-run']):\n"
        "    try:\n"
        "        cli.main(args, standalone_mode=False)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"CLUSTERCTL_RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_dry_run_renders_a_pending_chain(clusterctl, tmp_path):
    out = json.loads(clusterctl("submit", "sft", "--nodes", "3", "--stages", "sft,convert", "--dry-run",
                                "--json").stdout)
    run = Run(out["dir"])
    assert out["run"] == run.id and run.dir.parent == tmp_path / "runs"
    assert sorted(p.name for p in run.stage_dir("sft").glob("node-*.sh")) == \
        ["node-000.sh", "node-001.sh", "node-002.sh"]
    assert not run.stage_dir("deploy").exists()
    status = json.loads(clusterctl("status", "--json").stdout)   # the newest run by default
    assert status["run"] == run.id
    assert {s: r["state"] for s, r in status["stages"].items()} == {"sft": "PENDING", "convert": "PENDING"}
    train = json.loads((run.stage_dir("sft") / "train.json").read_text())
    assert train["output_dir"] == status["stages"]["sft"]["output"]
    assert json.loads((run.stage_dir("sft") / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3


def test_stage_list_must_be_consecutive(clusterctl):
    result = clusterctl("submit", "sft", "--stages", "sft,deploy", "--dry-run", check=False)
    assert result.returncode == 2 and "are not consecutive" in result.stderr


def test_logs_prefix_every_line_with_stage_and_node(clusterctl):
    out = json.loads(clusterctl("submit", "sft", "--nodes", "2", "--dry-run", "--json").stdout)
    run = Run(out["dir"])
    for rank in range(2):
        run.log_path("sft", rank).parent.mkdir(parents=True, exist_ok=True)
        run.log_path("sft", rank).write_text(f"hello from {rank}\nbye\n")
    lines = clusterctl("logs", run.id).stdout.splitlines()
    assert lines == ["sft/node-000: hello from 0", "sft/node-000: bye", "sft/node-001: hello from 1",
                     "sft/node-001: bye"]
    assert clusterctl("logs", run.id, "--node", "1").stdout.splitlines() == lines[2:]


def test_unknown_run_says_where_it_looked(clusterctl, tmp_path):
    result = clusterctl("status", "nope", check=False)
    assert result.returncode == 2
    assert f"no run 'nope' under {tmp_path / 'runs'}" in result.stderr
