"""The Slurm backend: one sbatch script per stage, the whole chain queued at once with
`--dependency=afterok`, so the run goes on with no process of ours alive.

State comes from the scheduler (squeue, then `scontrol show job`, then `sacct -c`, which works
with accounting off when JobCompType=jobcomp/filetxt) and, once Slurm has forgotten a job, from
the run folder's own exit markers."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

from clusterctl.backends.base import Backend
from clusterctl.errors import ConfigError, UserError
from clusterctl.render import render_template
from clusterctl.run import FINISHED, Run, recorded_exit

TIMEOUT_S = 60
# sbatch options clusterctl sets itself: which setting to use instead.
CONTROLLED = {
    "nodes": "the job spec's nodes (--nodes)", "N": "the job spec's nodes (--nodes)",
    "ntasks": "nothing: one task per node", "n": "nothing: one task per node",
    "ntasks-per-node": "nothing: one task per node; gpus_per_node sets the ranks per node",
    "output": "nothing: logs go to the run folder", "o": "nothing: logs go to the run folder",
    "error": "nothing: logs go to the run folder", "e": "nothing: logs go to the run folder",
    "open-mode": "nothing: logs are appended across requeues",
    "dependency": "nothing: stages are chained by clusterctl", "d": "nothing: stages are chained by clusterctl",
    "kill-on-invalid-dep": "nothing: stages are chained by clusterctl",
    "signal": "slurm.signal_seconds", "requeue": "slurm.max_restarts", "no-requeue": "slurm.max_restarts",
    "job-name": "the job spec's name", "J": "the job spec's name", "parsable": "nothing",
    "partition": "slurm.partition", "p": "slurm.partition", "account": "slurm.account", "A": "slurm.account",
    "time": "slurm.time", "t": "slurm.time", "gpus-per-node": "gpus_per_node",
    "chdir": "nothing: jobs start in their stage folder", "D": "nothing: jobs start in their stage folder",
}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}
FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED", "DEADLINE"}


def slurm(*argv: str) -> subprocess.CompletedProcess:
    """Every Slurm command goes through here: bounded, and a missing tool is a user error; the
    caller reads the exit status (a finished job is an error to squeue, not to us)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} not found: the slurm backend runs on a Slurm login node",
                        fix="run clusterctl where sbatch/squeue work, or install slurm-client") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(argv)}` did not answer in {TIMEOUT_S} s",
                        fix="check slurmctld (`scontrol ping`)") from None
    return proc


def sbatch_escape(value: str) -> str:
    """One #SBATCH argument. sbatch splits on blanks and ends the line at `#` outside double
    quotes; inside them `\\` escapes (verified on 22.05: a bare `\\ ` does not protect a blank)."""
    if re.fullmatch(r"[\w.,:/%=@+-]*", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pattern_escape(path: str) -> str:
    """A literal path inside a Slurm file-name pattern (--output), where `%` is special."""
    return path.replace("%", "%%")


def extra_options(cluster) -> list[str]:
    """slurm.extra_options as #SBATCH arguments; options clusterctl controls are refused."""
    options = []
    for key, value in cluster.slurm.extra_options.items():
        where = f"{cluster.source}: slurm.extra_options.{key}"
        name = str(key).lstrip("-")
        if name in CONTROLLED:
            raise ConfigError(f"--{name} is set by clusterctl", where=where,
                              fix=f"remove it; use {CONTROLLED[name]}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
            raise ConfigError(f"{key!r} is not an sbatch option name", where=where,
                              fix="write option names without dashes, e.g. constraint: h100")
        value = "" if value is None or value is True else str(value)
        if "\n" in value or "\r" in value:
            raise ConfigError("the value contains a newline", where=where, fix="write it on one line")
        flag = f"-{name}" if len(name) == 1 else f"--{name}"
        options.append(flag if value == "" else (f"{flag} " if len(name) == 1 else f"{flag}=") + sbatch_escape(value))
    return options


def sbatch_options(cluster, run: Run, stage: dict, job_name: str, requeue: dict | None) -> list[str]:
    """The #SBATCH lines of one stage: what clusterctl controls, then the user's extra options."""
    slurm_settings = cluster.slurm
    if "\n" in str(run.dir):
        raise UserError(f"the run folder {run.dir!r} contains a newline", where=f"{cluster.source}: runs_dir",
                        fix="pick a runs_dir without newlines")
    options = [f"--job-name={sbatch_escape(job_name)}", f"--nodes={stage['nodes']}", "--ntasks-per-node=1"]
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    for name, value in (("partition", slurm_settings.partition), ("account", slurm_settings.account),
                        ("time", slurm_settings.time)):
        if "\n" in value:
            raise ConfigError("the value contains a newline", where=f"{cluster.source}: slurm.{name}")
        if value:
            options.append(f"--{name}={sbatch_escape(value)}")
    # The submitting shell's folder may not exist on the nodes (slurmd would fall back to /tmp).
    options += [f"--chdir={sbatch_escape(stage['dir'])}",
                f"--output={sbatch_escape(pattern_escape(stage['log_dir']))}/slurm-%j.log", "--open-mode=append"]
    if requeue:
        options += [f"--signal=B:USR2@{requeue['signal_seconds']}", "--requeue"]
    else:
        options.append("--no-requeue")
    return options + extra_options(cluster)


def requeue_settings(cluster, stage: str) -> dict | None:
    """SFT checkpoints on USR2 and resumes: only it is requeued, within slurm.max_restarts."""
    settings = cluster.slurm
    if stage != "sft" or settings.signal_seconds <= 0 or settings.max_restarts <= 0:
        return None
    return {"signal_seconds": settings.signal_seconds, "max_restarts": settings.max_restarts}


def map_state(slurm_state: str) -> str:
    state = slurm_state.split()[0].rstrip("+") if slurm_state else ""
    if state in QUEUED:
        return "PENDING"
    if state in ACTIVE:
        return "RUNNING"
    if state == "COMPLETED":
        return "COMPLETED"
    if state in FAILED:
        return "FAILED"
    if state in ("CANCELLED", "REVOKED"):
        return "CANCELLED"
    return ""


def query_job(job_id: str) -> dict | None:
    """{"state", "slurm_state", "reason", "exit_code", "restarts"} from the first source that knows the job."""
    proc = slurm("squeue", "-h", "-j", job_id, "-O", "State:30,RestartCnt:10,Reason:500")
    fields = proc.stdout.split(None, 2) if proc.returncode == 0 else []
    if len(fields) == 3 and fields[0] in QUEUED | ACTIVE:
        return {"state": map_state(fields[0]), "slurm_state": fields[0], "restarts": int(fields[1]),
                "reason": fields[2].strip()}
    proc = slurm("scontrol", "-o", "show", "job", job_id)
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        fields = dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
        return {"state": map_state(fields["JobState"]), "slurm_state": fields["JobState"],
                "reason": fields.get("Reason", "None"), "exit_code": fields.get("ExitCode", ""),
                "restarts": int(fields.get("Restarts", "0") or 0)}
    proc = slurm("sacct", "-c", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode")
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if proc.returncode == 0 and len(parts) == 3 and parts[0] == job_id:
            return {"state": map_state(parts[1]), "slurm_state": parts[1].split()[0], "reason": "None",
                    "exit_code": parts[2]}
    return None


STOPPED = (143, 137)  # a node script ended by TERM/KILL: srun stopping it after another node failed


def marker_exits(run: Run, stage: str, nodes: int) -> dict[int, int]:
    """Exit codes the node scripts recorded (state/<stage>/node-NNN.exit), by rank, in the order written."""
    found = []
    for rank in range(nodes):
        path = run.node_marker(stage, rank, "exit")
        try:
            found.append((path.stat().st_mtime, rank, int(path.read_text().strip())))
        except (OSError, ValueError):
            pass
    return {rank: code for _, rank, code in sorted(found)}


def node_outcome(exits: dict[int, int], nodes: int, ended: bool) -> tuple[dict[str, str], list[int]]:
    """(state of each node, the nodes that failed by themselves): the first failure is the cause;
    nodes stopped by a signal after it, or before they could record anything once the job has
    ended, were cancelled by srun --kill-on-bad-exit."""
    first = next((rank for rank, code in exits.items() if code != 0), None)
    failed = [r for r, code in exits.items() if code != 0 and (r == first or code not in STOPPED)]
    states = {}
    for rank in range(nodes):
        code = exits.get(rank)
        states[str(rank)] = (("CANCELLED" if ended else "RUNNING") if code is None else
                             "COMPLETED" if code == 0 else "FAILED" if rank in failed else "CANCELLED")
    return states, failed


def outcome_from_markers(state_dir: Path, exits: dict[int, int], nodes: int) -> dict | None:
    """A forgotten job's end, as query_job would give it, from the run folder: the batch script's
    job.exit; else the nodes' markers, where one failure is enough (srun --kill-on-bad-exit stops the
    others, possibly before they can record anything). None while nothing decides."""
    code = recorded_exit(state_dir / "job.exit")
    if code is None:
        failures = [c for c in exits.values() if c != 0]
        if not failures and len(exits) < nodes:
            return None
        code = failures[0] if failures else 0
    return {"state": "COMPLETED" if code == 0 else "FAILED", "slurm_state": "", "reason": "None",
            "exit_code": f"{code}:0"}


class SlurmBackend(Backend):
    name = "slurm"

    def render_extras(self, run: Run, stage: str, context: dict, *, header) -> dict[str, str]:
        requeue = requeue_settings(self.cluster, stage)
        job_name = f"{context['job'].name}-{stage}"
        script = run.stage_dir(stage) / "job.sbatch"
        text = render_template(
            "slurm/job.sbatch.j2", **context, requeue=requeue,
            header=header(f"run {run.id}, stage {stage}, {context['stage']['nodes']} node(s) (slurm backend)",
                          f"sbatch {script}   (after the previous stage: --dependency=afterok:JOBID)"),
            sbatch_options=sbatch_options(self.cluster, run, context["stage"], job_name, requeue),
            node_log=pattern_escape(str(run.log_dir(stage))) + "/node-%3n.log")
        return {"job.sbatch": text}

    def submit(self, run: Run, stages: list[str]) -> None:
        """sbatch every stage at once, each after the previous one succeeded; all or nothing."""
        submitted: list[str] = []
        previous = None
        for stage in stages:
            run.log_dir(stage).mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
            run.state_dir(stage).mkdir(parents=True, exist_ok=True)
            for stale in [*run.state_dir(stage).glob("node-*"), run.state_dir(stage) / "job.exit"]:
                stale.unlink(missing_ok=True)  # an earlier attempt's markers must not be read as this one's
            argv = ["sbatch", "--parsable"]
            if previous:
                argv += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
            proc = slurm(*argv, str(run.stage_dir(stage) / "job.sbatch"))
            if proc.returncode != 0:
                if submitted:
                    slurm("scancel", *submitted)
                message = f"sbatch refused stage {stage} of run {run.id}: {proc.stderr.strip()}"
                self._give_up(run, stages, stage, message)
                raise UserError(message, where=str(run.stage_dir(stage) / "job.sbatch"),
                                fix="check slurm.partition/account/time and extra_options in cluster.yaml")
            previous = proc.stdout.strip().split(";")[0]
            submitted.append(previous)
            run.set_stage(stage, state="PENDING", job_id=previous, submitted=time.time())

    @staticmethod
    def _give_up(run: Run, stages: list[str], failed: str, message: str) -> None:
        """A submission that could not queue every stage leaves none queued, and says why."""
        def change(data):
            for stage in stages:
                _apply(data["stages"][stage], {"state": "FAILED", "reason": message} if stage == failed
                       else {"state": "CANCELLED", "reason": f"stage {failed} could not be submitted"})
        run.update(change)

    def refresh(self, run: Run) -> dict:
        data = run.read()
        if data.get("dry_run"):
            return data
        updates: dict[str, dict] = {}
        broken = None  # the first stage that failed or was cancelled: later ones cannot run
        for stage in data["chain"]:
            record = data["stages"][stage]
            if broken and record["state"] not in FINISHED:
                if record.get("job_id"):
                    slurm("scancel", record["job_id"])
                updates[stage] = {"state": "CANCELLED", "reason": f"{broken} did not complete"}
                continue
            if record["state"] not in FINISHED and record.get("job_id"):
                updates[stage] = self._stage_update(run, stage, record)
            state = updates.get(stage, {}).get("state", record["state"])
            if state in ("FAILED", "CANCELLED"):
                broken = broken or stage
        if updates:
            data = run.update(lambda d: [_apply(d["stages"][s], u) for s, u in updates.items()])
        return data

    def _stage_update(self, run: Run, stage: str, record: dict) -> dict:
        job_id, nodes = record["job_id"], record["nodes"]
        info = query_job(job_id)
        exits = marker_exits(run, stage, nodes)
        update: dict = {}
        if info is None:  # Slurm has forgotten the job: the run folder's markers decide
            info = outcome_from_markers(run.state_dir(stage), exits, nodes)
            if info is None:
                return {"reason": f"Slurm no longer knows job {job_id}, and {run.state_dir(stage)} holds "
                                  f"neither its job.exit nor a failed or every node's exit"}
        state = info["state"] or record["state"]
        update.update(state=state, reason="")
        if info.get("restarts"):
            update["restarts"] = info["restarts"]
        if state == "PENDING" and info["reason"] == "DependencyNeverSatisfied":
            slurm("scancel", job_id)
            update.update(state="CANCELLED", reason="an earlier stage did not complete")
        elif state == "PENDING" and info["reason"] not in ("None", ""):
            update["reason"] = f"waiting: {info['reason']}"
        node_states, failed = node_outcome(exits, nodes, ended=state in FINISHED)
        if state in ("RUNNING", "COMPLETED", "FAILED"):
            update["node_states"] = node_states
        if state == "FAILED":
            update.update(failed_nodes=failed, exit_code=exits[failed[0]] if failed else _slurm_exit(info),
                          reason=f"Slurm job {job_id} {info['slurm_state'] or 'failed'}"
                                 f"{' (' + info['reason'] + ')' if info['reason'] not in ('None', '') else ''}"
                                 f"; see logs/{stage}/")
        elif state == "CANCELLED" and "reason" not in update:
            update["reason"] = (f"Slurm job {job_id} cancelled" if info["reason"] != "DependencyNeverSatisfied"
                                else "an earlier stage did not complete")
        elif state == "COMPLETED":
            update["exit_code"] = 0
        if stage == "deploy":
            update.update(_endpoint(run))
        return update

    def cancel(self, run: Run) -> None:
        """scancel every stage's job, wait until Slurm lets go of them, mark what was left CANCELLED."""
        data = run.read()
        job_ids = [data["stages"][s]["job_id"] for s in data["chain"] if data["stages"][s].get("job_id")]
        if job_ids:
            slurm("scancel", *job_ids)
            deadline = time.time() + 60
            while time.time() < deadline:
                out = slurm("squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)).stdout
                if not [line for line in out.splitlines() if line.split("|")[-1] in QUEUED | ACTIVE]:
                    break
                time.sleep(0.5)

        def change(record):
            for stage in record["chain"]:
                if record["stages"][stage]["state"] not in FINISHED:
                    record["stages"][stage].update(state="CANCELLED", reason="cancelled by the user",
                                                   ended=time.time())
        run.update(change)


def _slurm_exit(info: dict) -> int:
    """Slurm's "CODE:SIGNAL" as one shell-style status (128 + signal when killed)."""
    code, _, sig = info.get("exit_code", "").partition(":")
    return int(code) if code.isdigit() and int(code) else (128 + int(sig) if sig.isdigit() and int(sig) else 1)


def _endpoint(run: Run) -> dict:
    try:
        endpoint = json.loads((run.state_dir("deploy") / "endpoint.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"endpoint": endpoint["url"], "served_model": endpoint.get("model")}


def _apply(record: dict, update: dict) -> None:
    if update.get("state") == "RUNNING" and "started" not in record:
        record["started"] = time.time()
    if update.get("state") in FINISHED and "ended" not in record:
        record["ended"] = time.time()
    record.update(update)


BACKEND = SlurmBackend
