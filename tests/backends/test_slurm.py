"""The Slurm backend against a real 4-node Slurm cluster (slurmctld + 4 slurmd, one network
namespace per node), through the real CLI. Node scripts run small programs (tests/backends/programs)
in place of training; everything else (rendering, sbatch, srun, dependencies, status) is the product's."""
import json
import os
import subprocess
import time

import pytest
from fixtures.runs import finished, program, submit, write_cluster
from fixtures.slurm_cluster import SlurmCluster

from clusterctl.backends.slurm import extra_options, outcome_from_markers
from clusterctl.config import load_cluster
from clusterctl.errors import ConfigError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def slurm():
    """4 nodes; a finished job is forgotten by slurmctld after 10 s, so `sacct -c` and the run
    folder's markers are exercised as they are on a real cluster after MinJobAge."""
    with SlurmCluster(nodes=4, gpus_per_node=2, min_job_age=10) as cluster:
        saved = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = cluster.conf
        try:
            yield cluster
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF")
            else:
                os.environ["SLURM_CONF"] = saved


def cluster_yaml(tmp_path, slurm, setup: dict, **slurm_settings) -> str:
    return write_cluster(tmp_path / "cluster.yaml", {
        "backend": "slurm", "slurm": {"partition": slurm.partition, "time": "10:00", **slurm_settings},
        "setup": setup})


def scontrol(slurm, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm.env, capture_output=True,
                         text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_sft_on_4_nodes_forms_one_rendezvous(slurm, clusterctl, wait_for, tmp_path):
    comment = 'a # "quoted" value'
    yaml = write_cluster(tmp_path / "cluster.yaml", {
        "backend": "slurm", "gpus_per_node": 2,
        "slurm": {"partition": slurm.partition, "time": "10:00", "extra_options": {"comment": comment}},
        "setup": {"sft": ['echo "gpus=$CUDA_VISIBLE_DEVICES cwd=$PWD"', program("rendezvous")]}})
    run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft", "--nodes", "4", "--cluster", yaml)
    status = wait_for(run_id, finished, what="sft to finish")
    job_id = status["stages"]["sft"]["job_id"]
    assert status["stages"]["sft"]["state"] == "COMPLETED", status

    seen = [json.loads((run_dir / "state/sft" / f"rendezvous-{r:03d}.json").read_text()) for r in range(4)]
    assert [s["rank"] for s in seen] == [0, 1, 2, 3]
    assert sorted(s["host"] for s in seen) == slurm.node_names          # one task on every node
    assert {s["master_addr"] for s in seen} == {slurm.node_names[0]}    # resolved at run time
    assert {s["sum"] for s in seen} == {6.0} and {s["world"] for s in seen} == {4}
    for rank in range(4):
        log = (run_dir / "logs/sft" / f"node-{rank:03d}.log").read_text()
        assert f"sft node {rank}/4 on" in log and "rendezvous ok" in log
        assert f"gpus=0,1 cwd={run_dir / 'sft'}\n" in log   # not the submitting shell's folder
        assert (run_dir / "state/sft" / f"node-{rank:03d}.exit").read_text().strip() == "0"
    script = (run_dir / "sft/job.sbatch").read_text()
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=2" in script
    # The hostile extra option reached Slurm intact (a `#` would otherwise end the #SBATCH line).
    assert f'Comment={comment}' in subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm.env,
                                                   capture_output=True, text=True, timeout=30).stdout


def test_three_stages_run_in_order(slurm, clusterctl, wait_for, tmp_path):
    stamp = 'echo "$STAGE $1 $(date +%s.%N)" >> "$RUN_DIR/order.txt"'
    line = f"f() {{ {stamp}; }}; f start; sleep 1; f end; exit 0"
    yaml = cluster_yaml(tmp_path, slurm, {"all": [line]})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "2", "--cluster", yaml)
    queued = json.loads(clusterctl("status", run_id, "--json").stdout)["stages"]
    ids = [queued[s]["job_id"] for s in ("sft", "convert", "deploy")]
    assert len(set(ids)) == 3   # the whole chain is queued at once
    status = wait_for(run_id, finished, what="the chain")
    assert [status["stages"][s]["state"] for s in ("sft", "convert", "deploy")] == ["COMPLETED"] * 3
    events = [line.split() for line in (run_dir / "order.txt").read_text().splitlines()]
    last_end = {stage: max(float(t) for s, what, t in events if s == stage and what == "end") for stage in
                ("sft", "convert")}
    first_start = {stage: min(float(t) for s, what, t in events if s == stage and what == "start") for stage in
                   ("convert", "deploy")}
    assert last_end["sft"] < first_start["convert"] and last_end["convert"] < first_start["deploy"]
    assert len([e for e in events if e[0] == "sft"]) == 4   # 2 nodes x start/end


def test_failed_sft_cancels_the_rest(slurm, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, slurm, {
        "sft": ['if [ "$NODE_RANK" = 2 ]; then exit 3; fi; sleep 60; exit 0'],
        "all": ['echo started >> "$RUN_DIR/started-$STAGE"']})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", yaml)
    status = wait_for(run_id, finished, timeout=60, what="the failure")["stages"]
    assert status["sft"]["state"] == "FAILED" and status["sft"]["exit_code"] == 3, status
    assert status["sft"]["failed_nodes"][0] == 2 and "logs/sft/" in status["sft"]["reason"]
    for stage in ("convert", "deploy"):
        assert status[stage]["state"] == "CANCELLED", status
        assert not (run_dir / f"started-{stage}").exists()          # never started
    # Slurm drops the dependents itself (--kill-on-invalid-dep), at its next scheduling pass; no read cancels them
    ids = {status[s]["job_id"] for s in status}
    deadline = time.monotonic() + 60
    while set(slurm.squeue()) & ids and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(slurm.squeue()) & ids
    text = clusterctl("status", run_id).stdout
    assert "sft      FAILED" in text and "convert  CANCELLED" in text


def test_cancel_removes_every_job(slurm, clusterctl, wait_for, tmp_path):
    yaml = cluster_yaml(tmp_path, slurm, {"all": ["sleep 120"]})
    run_id, run_dir = submit(clusterctl, "sft", "--nodes", "4", "--cluster", yaml)
    wait_for(run_id, lambda s: s["sft"]["state"] == "RUNNING" and
             len(list((run_dir / "state/sft").glob("node-*.pid"))) == 4, what="sft to run on 4 nodes")
    ids = {r["job_id"] for r in json.loads(clusterctl("status", run_id, "--json").stdout)["stages"].values()}
    cancelled = json.loads(clusterctl("cancel", run_id, "--json").stdout)["stages"]
    assert {r["state"] for r in cancelled.values()} == {"CANCELLED"}
    assert not set(slurm.squeue()) & ids
    # The node scripts were stopped (TERM -> their EXIT trap records 143), not left running.
    exits = [(run_dir / "state/sft" / f"node-{r:03d}.exit") for r in range(4)]
    assert all(e.exists() and e.read_text().strip() != "0" for e in exits)


def test_status_with_accounting_off(slurm, clusterctl, wait_for, tmp_path):
    """Slurm forgets finished jobs after MinJobAge; with accounting off `sacct -c` still knows them,
    and once that record is gone too, the run folder's exit markers decide."""
    accounting = subprocess.run(["sacct", "-j", "1"], env=slurm.env, capture_output=True, text=True, timeout=30)
    assert accounting.returncode != 0 and "accounting storage is disabled" in accounting.stderr
    yaml = cluster_yaml(tmp_path, slurm, {"sft": ['[ "$NODE_RANK" = 1 ] && exit 4; exit 0']})
    runs = [submit(clusterctl, "sft", "--stages", "sft", "--nodes", "2", "--cluster", yaml) for _ in range(2)]
    run_dir = runs[0][1]
    job_ids = [json.loads((d / "run.json").read_text())["stages"]["sft"]["job_id"] for _, d in runs]

    def forgotten(job_id: str) -> bool:
        return subprocess.run(["scontrol", "show", "job", job_id], env=slurm.env, capture_output=True,
                              timeout=30).returncode != 0
    deadline = time.monotonic() + 90
    while not all(forgotten(j) for j in job_ids):
        assert time.monotonic() < deadline, "slurmctld did not forget the jobs (MinJobAge)"
        time.sleep(1)
    first = wait_for(runs[0][0], finished, timeout=5)["stages"]["sft"]   # from sacct -c
    assert first["state"] == "FAILED" and first["exit_code"] == 4 and first["failed_nodes"] == [1], first
    assert (run_dir / "state/sft/node-001.exit").read_text().strip() == "4"
    open(slurm.jobcomp, "w").close()                                         # sacct -c forgets it too
    markers = runs[1][1] / "state/sft"
    assert int((markers / "job.exit").read_text()) != 0                     # the batch script's own record
    # srun may stop node 0 before its script has set the trap that records an exit (seen in CI):
    # node 1's failure alone must decide.
    (markers / "node-000.exit").unlink(missing_ok=True)
    (markers / "job.exit").unlink()
    second = wait_for(runs[1][0], finished, timeout=5)["stages"]["sft"]  # from the markers
    assert second["state"] == "FAILED" and second["failed_nodes"] == [1] and second["exit_code"] == 4, second
    assert second["node_states"] == {"0": "CANCELLED", "1": "FAILED"}, second


@pytest.mark.parametrize("job_exit, exits, expected", [
    ("0", {}, ("COMPLETED", "0:0")),                  # the batch script's record decides alone
    ("143", {1: 4}, ("FAILED", "143:0")),
    (None, {1: 4}, ("FAILED", "4:0")),                # one failed node is enough (srun stops the rest)
    (None, {0: 0, 1: 0}, ("COMPLETED", "0:0")),
    (None, {0: 0}, None),                             # nothing says how node 1 ended: undecided
])
def test_outcome_of_a_forgotten_job(tmp_path, job_exit, exits, expected):
    if job_exit is not None:
        (tmp_path / "job.exit").write_text(job_exit + "\n")
    outcome = outcome_from_markers(tmp_path, exits, nodes=2)
    assert (outcome and (outcome["state"], outcome["exit_code"])) == expected


def test_usr2_checkpoints_and_requeues_within_the_budget(slurm, clusterctl, wait_for, tmp_path):
    """USR2 (what --signal=B:USR2@S sends before the time limit) reaches the program on every node,
    which checkpoints and exits non-zero; the job requeues once (max_restarts: 1), then fails."""
    yaml = cluster_yaml(tmp_path, slurm, {"sft": [f"trap '' USR2; {program('preemptible')}"]},
                        signal_seconds=120, max_restarts=1)
    run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft", "--nodes", "2", "--cluster", yaml)
    job_id = json.loads((run_dir / "run.json").read_text())["stages"]["sft"]["job_id"]
    state = run_dir / "state/sft"
    script = (run_dir / "sft/job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR2@120" in script and "#SBATCH --requeue" in script

    def usr2_when_started(restart: int) -> None:
        wait_for(run_id, lambda s: all((state / f"started-{restart}-{r:03d}").exists() for r in range(2)),
                 timeout=90, what=f"both nodes to start (restart {restart})")
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], env=slurm.env, check=True, timeout=30)

    usr2_when_started(0)
    recorded = lambda: json.loads((run_dir / "run.json").read_text())["stages"]["sft"]  # noqa: E731
    wait_for(run_id, lambda s: s["sft"]["state"] == "PENDING" and recorded().get("restarts") == 1 and
             scontrol(slurm, job_id)["JobState"] == "PENDING", timeout=60, what="the requeue")
    assert all((state / f"checkpoint-0-{r:03d}").exists() for r in range(2))
    # Slurm holds a requeued job back for a while (BeginTime); let it go sooner. Not at once: slurmd
    # refuses a credential issued in the second it revoked the last one ("Job credential revoked").
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm.env, check=True,
                   timeout=30)
    usr2_when_started(1)
    final = wait_for(run_id, finished, timeout=60, what="the second preemption")["stages"]["sft"]
    assert final["state"] == "FAILED", final
    assert all((state / f"checkpoint-1-{r:03d}").exists() for r in range(2))
    batch_log = (run_dir / f"logs/sft/slurm-{job_id}.log").read_text()
    assert "requeueing (restart 1 of 1)" in batch_log and "restart budget of 1 spent" in batch_log
    assert "the training recorded no checkpoint for this stop" in batch_log     # the stand-in writes no preempted.json


@pytest.mark.parametrize("options, message", [
    ({"nodes": "8"}, "--nodes is set by clusterctl"),
    ({"--output": "x.log"}, "--output is set by clusterctl"),
    ({"dependency": "afterok:1"}, "--dependency is set by clusterctl"),
    ({"signal": "USR1@60"}, "--signal is set by clusterctl"),
    ({"comment": "two\nlines"}, "must be one line"),
    ({"bad name": "x"}, "is not an sbatch option name"),
])
def test_extra_options_clusterctl_controls_are_refused(tmp_path, options, message):
    yaml = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "slurm": {"extra_options": options}})
    with pytest.raises(ConfigError) as err:
        extra_options(load_cluster(yaml))
    key = next(iter(options))
    assert message in str(err.value) and f"slurm.extra_options.{key}" in str(err.value)
    assert "fix:" in str(err.value)


def test_extra_options_are_merged(tmp_path):
    yaml = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm", "slurm": {"extra_options": {
        "exclusive": "", "constraint": "h100&ib", "C": "x", "mem": "0"}}})
    assert extra_options(load_cluster(yaml)) == ["--exclusive", '--constraint="h100&ib"', "-C x", "--mem=0"]


@pytest.mark.slow
def test_time_limit_warning_comes_from_slurm_itself(slurm, clusterctl, wait_for, tmp_path):
    """No manual signal: --time=2 with slurm.signal_seconds=100 makes Slurm send USR2 to the batch script
    (B:) about 100 s before the limit (Slurm checks every 30-60 s); the job checkpoints and requeues."""
    yaml = cluster_yaml(tmp_path, slurm, {"sft": [f"trap '' USR2; {program('preemptible')}"]},
                        time="2", signal_seconds=100, max_restarts=1)
    run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft", "--nodes", "2", "--cluster", yaml)
    job_id = json.loads((run_dir / "run.json").read_text())["stages"]["sft"]["job_id"]
    wait_for(run_id, lambda s: scontrol(slurm, job_id).get("Restarts") == "1", timeout=150,
             what="Slurm's USR2 and the requeue")
    assert all((run_dir / "state/sft" / f"checkpoint-0-{r:03d}").exists() for r in range(2))
    assert "USR2: time limit in 100 s" in (run_dir / f"logs/sft/slurm-{job_id}.log").read_text()
    clusterctl("cancel", run_id)
