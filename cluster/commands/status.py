"""clusterctl status: the state of every stage of a run."""
import json

import click

from clusterctl.commands import options


def run_status(run) -> dict:
    """run.json brought up to date by the run's backend, in the `status --json` shape."""
    from clusterctl.backends.base import backend_of

    data = backend_of(run).refresh(run)
    keep = ("state", "nodes", "hosts", "job_id", "submitted", "restarts", "started", "ended", "exit_code",
            "reason", "failed_nodes", "node_states", "output", "endpoint", "served_model", "restart_log")
    stages = {stage: {k: v for k, v in data["stages"][stage].items() if k in keep} for stage in data["chain"]}
    return {"run": run.id, "dir": str(run.dir), "backend": data["backend"], "stages": stages}


@click.command("status")
@click.argument("run", required=False)
@options.runs_dir
@options.as_json
def command(run, runs_dir, as_json):
    """Show every stage of RUN (default: the newest run): state, nodes, output, endpoint."""
    from clusterctl.follow import describe
    from clusterctl.restarts import describe as describe_restart
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    status = run_status(found)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    click.echo(f"run {status['run']} ({status['backend']} backend): {status['dir']}")
    for stage, record in status["stages"].items():
        click.echo("  " + describe(found, stage, record))
        for restart in record.get("restart_log", []):   # automatic restarts after a crash, hang or time limit
            click.echo(f"           {describe_restart(restart)}")
        if record.get("output") and record["state"] == "COMPLETED":
            click.echo(f"           output: {record['output']}")
