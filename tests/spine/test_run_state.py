"""Run state: one enum, named transitions that stamp start and end, a finished stage's end is final,
and reading a run's status changes nothing on the scheduler."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.runs import as_submitted, dry_run

from clusterctl.follow import describe
from clusterctl.procs import Identity
from clusterctl.run import Run, StageState, transition


def test_transitions_stamp_start_and_end_and_keep_the_first_end():
    record = {"state": "PENDING"}
    assert transition(record, StageState.RUNNING, node_states={"0": "RUNNING", "1": "COMPLETED"})
    assert record["state"] == "RUNNING" and "started" in record and "ended" not in record
    assert transition(record, StageState.CANCELLED, reason="by the user")
    assert record["ended"] >= record["started"]
    assert not transition(record, StageState.COMPLETED, exit_code=0)   # a late report changes nothing
    assert record["state"] == "CANCELLED" and "exit_code" not in record
    assert not transition(record, None, endpoint="http://x")
    with pytest.raises(ValueError):
        transition({"state": "PENDING"}, "DONE")


def test_a_cancelled_stage_shows_no_running_node(tmp_path):
    record = {"state": "RUNNING", "node_states": {"0": "RUNNING"}, "endpoint": "http://127.0.0.1:8000"}
    transition(record, StageState.CANCELLED, reason="cancelled by the user")
    assert record["node_states"] == {"0": "CANCELLED"}
    assert "running" not in describe(Run(tmp_path), "deploy", record)


def test_retry_reset_keeps_only_where_a_stage_runs(clusterctl, tmp_path):
    run = Run(dry_run(clusterctl, tmp_path))
    run.apply({"sft": {"state": "FAILED", "reason": "x", "exit_code": 3}})
    data = run.reset(["sft", "convert", "deploy"])
    assert data["stages"]["sft"] == {"state": "PENDING", "nodes": 2, "hosts": ["localhost"] * 2,
                                     "output": str(run.stage_dir("sft") / "checkpoints")}
    assert data["stages"]["deploy"]["endpoint"] == "" and data["dry_run"] is False


def test_a_dead_supervisor_fails_the_unfinished_stages_with_an_end_time(clusterctl, tmp_path):
    run_dir = dry_run(clusterctl, tmp_path)
    as_submitted(run_dir)
    Run(run_dir).start("sft")
    gone = subprocess.Popen(["true"])
    identity = Identity.of(gone.pid)
    gone.wait()
    Run(run_dir).update(lambda data: data.update(supervisor=identity.to_record()))
    stages = json.loads(clusterctl("status", run_dir, "--json").stdout)["stages"]
    for record in stages.values():
        assert record["state"] == "FAILED" and record["reason"].startswith("the supervisor process died")
        assert record["ended"] > 0
    assert stages["sft"]["ended"] >= stages["sft"]["started"]


def stand_ins(folder: Path, programs: dict[str, str]) -> dict:
    """An environment whose PATH holds only `programs` (name -> bash body) and the basic tools;
    each call is appended to folder/calls."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name, body in programs.items():
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {folder}/calls\n{body}\n')
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin"}


SLURM = {"backend": "slurm", "slurm": {"partition": "debug", "time": "10:00"}}


def test_status_cancels_nothing(clusterctl, tmp_path):
    """A stage whose dependency can never be satisfied is shown CANCELLED; Slurm drops it itself
    (--kill-on-invalid-dep), so status does not run scancel."""
    run_dir = dry_run(clusterctl, tmp_path, SLURM)
    as_submitted(run_dir, state="PENDING", job_id="41")
    env = stand_ins(tmp_path, {"squeue": 'echo "PENDING   0   DependencyNeverSatisfied"',
                               "scontrol": "exit 1", "sacct": "exit 1", "scancel": "exit 0"})
    stages = json.loads(clusterctl("status", run_dir, "--json", env=env).stdout)["stages"]
    assert [stages[s]["state"] for s in ("sft", "convert", "deploy")] == ["CANCELLED"] * 3
    calls = (tmp_path / "calls").read_text()
    assert "squeue" in calls and "scancel" not in calls


def test_a_missing_sbatch_fails_the_stage_instead_of_leaving_it_pending(clusterctl, tmp_path):
    yaml = tmp_path / "slurm.yaml"
    yaml.write_text(json.dumps({"python": sys.executable, **SLURM}))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = clusterctl("submit", "sft", "--nodes", "2", "--cluster", yaml, "--json", check=False,
                        env={"PATH": str(empty)})
    assert result.returncode == 2 and "clusterctl: error: " in result.stderr and "sbatch not found" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    stages = Run(run_dir).read()["stages"]
    assert stages["sft"]["state"] == "FAILED" and "sbatch not found" in stages["sft"]["reason"]
    assert [stages[s]["state"] for s in ("convert", "deploy")] == ["CANCELLED", "CANCELLED"]
    assert all("ended" in record for record in stages.values())


def test_a_job_cancelled_outside_clusterctl_says_so(clusterctl, tmp_path):
    run_dir = dry_run(clusterctl, tmp_path, SLURM, "--stages", "sft")
    as_submitted(run_dir, state="PENDING", job_id="41")
    env = stand_ins(tmp_path, {"squeue": "exit 1", "sacct": "exit 1",
                               "scontrol": 'echo "JobId=41 JobName=x JobState=CANCELLED Reason=None ExitCode=0:15"'})
    sft = json.loads(clusterctl("status", run_dir, "--json", env=env).stdout)["stages"]["sft"]
    assert sft["state"] == "CANCELLED" and sft["reason"] == "Slurm job 41 cancelled" and sft["ended"] > 0


@pytest.mark.parametrize("field, value, message", [
    ("node_states", {"0": 7}, "stages.sft.node_states is not a map of node rank to state"),
    ("node_states", ["RUNNING"], "stages.sft.node_states is not a map of node rank to state"),
    ("job_id", 41, "stages.sft.job_id is not text"),
    ("state", "DONE", "stages.sft.state is 'DONE'"),
    ("hosts", "node1", "stages.sft.nodes/hosts have the wrong type"),
])
def test_a_damaged_stage_record_is_named(clusterctl, tmp_path, field, value, message):
    run = Run(dry_run(clusterctl, tmp_path))
    data = json.loads(run.json_path.read_text())
    data["stages"]["sft"][field] = value
    run.json_path.write_text(json.dumps(data))
    result = clusterctl("status", run.id, check=False)
    assert result.returncode == 2 and f"clusterctl: error: {run.json_path}: {message}" in result.stderr
