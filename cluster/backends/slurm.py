"""The Slurm backend: one sbatch script per stage, the whole chain queued at once with
`--dependency=afterok`, so the run goes on with no process of ours alive.

State comes from the scheduler (squeue, then `scontrol show job`, then `sacct -c`, which works
with accounting off when JobCompType=jobcomp/filetxt) and, once Slurm has forgotten a job, from
the run folder's own exit markers."""
from __future__ import annotations

import getpass
import re
import subprocess
import time
from pathlib import Path

from clusterctl.backends.base import Backend, parse_probes
from clusterctl.errors import ConfigError, UserError
from clusterctl.render import render_template
from clusterctl.restarts import RESTART_LOG, read_faults, slurm_restart_log
from clusterctl.run import FINISHED, STAGE_NAMES, Run, StageState, recorded_endpoint, recorded_exit

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
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL,
                              check=False)
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
        value = "" if value is None or value is True else str(value)   # one line: the cluster file's check
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
                        ("time", slurm_settings.time)):   # one line each: the cluster file's check
        if value:
            options.append(f"--{name}={sbatch_escape(value)}")
    # The submitting shell's folder may not exist on the nodes (slurmd would fall back to /tmp).
    options += [f"--chdir={sbatch_escape(stage['dir'])}",
                f"--output={sbatch_escape(pattern_escape(stage['log_dir']))}/slurm-%j.log", "--open-mode=append"]
    if requeue:
        options += [f"--signal=B:USR2@{requeue['signal_seconds']}"] if requeue["signal_seconds"] else []
        options.append("--requeue")
    else:
        options.append("--no-requeue")
    return options + extra_options(cluster)


def requeue_settings(cluster, run: Run, stage: str) -> dict | None:
    """Training (sft, grpo, dpo, simpo) checkpoints on USR2 and resumes: only it is requeued, within
    slurm.max_restarts. `preempted` is the note the trainer writes once that checkpoint is complete."""
    settings = cluster.slurm
    if stage not in ("sft", "grpo", "dpo", "simpo", "ppo") or settings.max_restarts <= 0:
        return None
    # A crash or hang a node recorded (state/<stage>/node-NNN.fault, training/watchdog.py) requeues it too.
    return {"signal_seconds": settings.signal_seconds, "max_restarts": settings.max_restarts,
            "preempted": str(run.stage_dir(stage) / "checkpoints" / "preempted.json")}


def map_state(slurm_state: str) -> StageState | None:
    """A Slurm job state (squeue/scontrol/sacct spelling, "CANCELLED by 1000", sacct's "+") as a stage state."""
    state = slurm_state.split()[0].rstrip("+") if slurm_state.strip() else ""
    if state in QUEUED:
        return StageState.PENDING
    if state in ACTIVE:
        return StageState.RUNNING
    if state == "COMPLETED":
        return StageState.COMPLETED
    if state in FAILED:
        return StageState.FAILED
    if state in ("CANCELLED", "REVOKED"):
        return StageState.CANCELLED
    return None


SQUEUE_FORMAT = "State:30,RestartCnt:10,Reason:500"


def query_job(job_id: str) -> dict | None:
    """{"state", "slurm_state", "reason", "exit_code", "restarts"} from the first source that knows the job."""
    proc = slurm("squeue", "-h", "-j", job_id, "-O", SQUEUE_FORMAT)
    info = parse_squeue(proc.stdout) if proc.returncode == 0 else None
    if info is None:
        proc = slurm("scontrol", "-o", "show", "job", job_id)
        info = parse_scontrol(proc.stdout) if proc.returncode == 0 else None
    if info is None:
        proc = slurm("sacct", "-c", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode")
        info = parse_sacct(proc.stdout, job_id) if proc.returncode == 0 else None
    return info


def parse_squeue(out: str) -> dict | None:
    """`squeue -h -O State,RestartCnt,Reason` of one job still queued or running; None otherwise
    (a finished job that squeue still lists has no exit code there: scontrol has it)."""
    fields = out.split(None, 2)
    if len(fields) < 2 or fields[0] not in QUEUED | ACTIVE or not fields[1].isdigit():
        return None
    return {"state": map_state(fields[0]), "slurm_state": fields[0], "restarts": int(fields[1]),
            "reason": fields[2].strip() if len(fields) == 3 else "None"}


def parse_scontrol(out: str) -> dict | None:
    """`scontrol -o show job ID`: one line of Key=Value fields."""
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    if "JobState" not in fields:
        return None
    restarts = fields.get("Restarts", "0")
    return {"state": map_state(fields["JobState"]), "slurm_state": fields["JobState"],
            "reason": fields.get("Reason", "None"), "exit_code": fields.get("ExitCode", ""),
            "restarts": int(restarts) if restarts.isdigit() else 0}


def parse_sacct(out: str, job_id: str) -> dict | None:
    """`sacct -c -n -P -o JobID,State,ExitCode`: the job's own line (not its steps'); the last one when a
    requeued job left one record per attempt."""
    found = None
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0] == job_id and parts[1].strip():
            found = {"state": map_state(parts[1]), "slurm_state": parts[1].split()[0], "reason": "None",
                     "exit_code": parts[2]}
    return found


def jobs_working_in(out: str, folders: set[str]) -> list[str]:
    """`squeue -h -o %i|%Z`: the jobs whose working folder is one of `folders`."""
    return [job for job, _, workdir in (line.partition("|") for line in out.splitlines()) if workdir in folders]


def still_queued(out: str) -> list[str]:
    """`squeue -h -o %i|%T`: the jobs still queued or running."""
    return [job for job, _, state in (line.partition("|") for line in out.splitlines()) if state in QUEUED | ACTIVE]


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
    return {"state": StageState.COMPLETED if code == 0 else StageState.FAILED, "slurm_state": "", "reason": "None",
            "exit_code": f"{code}:0"}


class SlurmBackend(Backend):
    name = "slurm"

    def master_addr_setup(self, hosts) -> str:
        """Slurm picks the nodes at run time: rank 0 is the first host of the job's allocation."""
        return ("# Resolved on the node at run time: the first host of this Slurm allocation.\n"
                'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"\n'
                "export MASTER_ADDR")

    def render_extras(self, run: Run, stage: str, context: dict, *, header) -> dict[str, str]:
        requeue = requeue_settings(self.cluster, run, stage)
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
            for stale in [*run.state_dir(stage).glob("node-*"), *run.state_dir(stage).glob("rank-*"),
                          run.state_dir(stage) / "job.exit", run.state_dir(stage) / RESTART_LOG]:
                stale.unlink(missing_ok=True)  # an earlier attempt's markers must not be read as this one's
            argv = ["sbatch", "--parsable"]
            if previous:
                argv += [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"]
            script = run.stage_dir(stage) / "job.sbatch"
            try:
                proc = slurm(*argv, str(script))
            except UserError as exc:   # no sbatch, or no answer: nothing of this stage was queued
                self._give_up(run, stages, stage, submitted, f"stage {stage} of run {run.id} was not submitted: {exc}")
                raise
            if proc.returncode != 0:
                message = f"sbatch refused stage {stage} of run {run.id}: {proc.stderr.strip()}"
                self._give_up(run, stages, stage, submitted, message)
                raise UserError(message, where=str(script),
                                fix="check slurm.partition/account/time and extra_options in cluster.yaml")
            previous = proc.stdout.strip().split(";")[0]
            submitted.append(previous)
            run.queue(stage, job_id=previous)

    @staticmethod
    def _give_up(run: Run, stages: list[str], failed: str, submitted: list[str], message: str) -> None:
        """A submission that could not queue every stage leaves none queued, and says why."""
        if submitted:
            try:
                slurm("scancel", *submitted)
            except UserError:
                pass   # scancel missing or stuck: the stages below are recorded as not running anyway
        run.apply({stage: {"state": StageState.FAILED, "reason": message} if stage == failed
                   else {"state": StageState.CANCELLED, "reason": f"stage {failed} could not be submitted"}
                   for stage in stages})

    def refresh(self, run: Run) -> dict:
        """Ask Slurm about every unfinished stage and record what it says. Reading changes no job:
        a stage after a failed one is shown CANCELLED (Slurm drops it itself: --kill-on-invalid-dep)."""
        data = run.read()
        if data.get("dry_run"):
            return data
        updates: dict[str, dict] = {}
        broken = None  # the first stage that failed or was cancelled: later ones cannot run
        for stage in data["chain"]:
            record = data["stages"][stage]
            if broken and record["state"] not in FINISHED:
                updates[stage] = {"state": StageState.CANCELLED, "reason": f"{broken} did not complete"}
                continue
            if record["state"] not in FINISHED and record.get("job_id"):
                updates[stage] = self._stage_update(run, stage, record)
            state = updates.get(stage, {}).get("state", record["state"])
            if state in (StageState.FAILED, StageState.CANCELLED):
                broken = broken or stage
        return run.apply(updates) if updates else data

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
        state = StageState(info["state"] or record["state"])
        restart_log = slurm_restart_log(run, stage)   # what the batch script recorded of each requeue
        if state.finished and len(restart_log) > info.get("restarts", len(restart_log)):
            state = StageState.PENDING   # the batch script asked for a requeue Slurm has not made yet
        update.update(state=state, reason="")
        if info.get("restarts"):
            update["restarts"] = info["restarts"]
        if restart_log:
            update.update(restart_log=restart_log, restarts=max(update.get("restarts", 0), len(restart_log)))
        never = info["reason"] == "DependencyNeverSatisfied"
        if state is StageState.PENDING and never:
            state = StageState.CANCELLED
            update.update(state=state, reason="an earlier stage did not complete")
        elif state is StageState.PENDING and info["reason"] not in ("None", ""):
            update["reason"] = f"waiting: {info['reason']}"
        node_states, failed = node_outcome(exits, nodes, ended=state.finished)
        if state in (StageState.RUNNING, StageState.COMPLETED, StageState.FAILED):
            update["node_states"] = node_states
        if state is StageState.FAILED:
            faults = read_faults(run, stage)   # a crash or hang after the restart budget was spent
            update.update(failed_nodes=failed, exit_code=exits[failed[0]] if failed else _slurm_exit(info),
                          reason=(f"{faults[0]['cause']} (node {faults[0].get('node')}, {faults[0].get('host')}); "
                                  if faults else "") + f"Slurm job {job_id} {info['slurm_state'] or 'failed'}"
                                 f"{' (' + info['reason'] + ')' if info['reason'] not in ('None', '') else ''}"
                                 f"; see logs/{stage}/")
        elif state is StageState.CANCELLED and not never:
            update["reason"] = f"Slurm job {job_id} cancelled"
        elif state is StageState.COMPLETED:
            update["exit_code"] = 0
        if stage == "deploy":
            update.update(recorded_endpoint(run))
        return update

    def cancel(self, run: Run) -> list[str]:
        """scancel every stage's job, wait until Slurm lets go of them, mark what was left CANCELLED."""
        data = run.read()
        self._scancel([data["stages"][s]["job_id"] for s in data["chain"] if data["stages"][s].get("job_id")])
        run.cancel(data["chain"], reason="cancelled by the user")
        return []

    def probe(self, argv: list[str], *, nodes: int | None, wait_s: int) -> list[dict]:
        """One task per node through srun (an allocation of `nodes` nodes, default 1, as the stages get);
        gives up when Slurm cannot allocate them within wait_s (srun would otherwise queue forever)."""
        nodes = nodes or 1
        settings = self.cluster.slurm
        srun = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--time=5", f"--immediate={wait_s}",
                "--job-name=clusterctl-doctor"]
        srun += [f"--{k}={v}" for k, v in (("partition", settings.partition), ("account", settings.account)) if v]
        if self.cluster.gpus_per_node:
            srun.append(f"--gpus-per-node={self.cluster.gpus_per_node}")
        try:
            proc = subprocess.run(srun + argv, capture_output=True, text=True, timeout=wait_s + 300,
                                  stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [{"target": "srun", "error": f"srun failed: {exc}"}]
        found = [{"target": row["host"], **row} for row in parse_probes(proc.stdout)]
        if len(found) < nodes:
            found.append({"target": "srun", "error": f"{nodes - len(found)} of {nodes} nodes did not answer "
                                                     f"(srun exited {proc.returncode}): {proc.stderr.strip()[-400:]}"})
        return found

    def cancel_unreadable(self, run: Run) -> int:
        """The jobs of this run are those Slurm runs in its stage folders (#SBATCH --chdir)."""
        out = slurm("squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%Z").stdout
        job_ids = jobs_working_in(out, {str(run.stage_dir(stage)) for stage in STAGE_NAMES})
        self._scancel(job_ids)
        return len(job_ids)

    @staticmethod
    def _scancel(job_ids: list[str]) -> None:
        if not job_ids:
            return
        slurm("scancel", *job_ids)
        deadline = time.time() + 60
        while time.time() < deadline:
            if not still_queued(slurm("squeue", "-h", "-o", "%i|%T", "-j", ",".join(job_ids)).stdout):
                break
            time.sleep(0.5)


def _slurm_exit(info: dict) -> int:
    """Slurm's "CODE:SIGNAL" as one shell-style status (128 + signal when killed)."""
    code, _, sig = info.get("exit_code", "").partition(":")
    return int(code) if code.isdigit() and int(code) else (128 + int(sig) if sig.isdigit() and int(sig) else 1)


BACKEND = SlurmBackend
