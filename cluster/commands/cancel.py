"""clusterctl cancel: stop every unfinished stage of a run, dependents included."""
import json

import click

from clusterctl.commands import options


@click.command("cancel")
@click.argument("run")
@options.runs_dir
@options.as_json
def command(run, runs_dir, as_json):
    """Cancel RUN: stop its nodes on every host and mark unfinished stages CANCELLED.

    Only processes this run started are signalled (a pid recorded in the run folder that now names
    another process is reported and left alone)."""
    from clusterctl.backends.base import backend_of
    from clusterctl.commands.status import run_status
    from clusterctl.errors import UserError
    from clusterctl.run import RunFileError, find_run

    found = find_run(runs_dir, run)
    backend = backend_of(found)
    try:
        found.read()
    except RunFileError as exc:
        stopped = backend.cancel_unreadable(found)
        raise UserError(f"{exc}\n  cancel stopped {stopped} process(es)/job(s) found from the run folder; "
                        "the stages' end could not be recorded in run.json") from None
    refused = backend.cancel(found)
    recorded = [m for record in found.read()["stages"].values() for m in record.get("refused", [])]
    for refusal in dict.fromkeys(refused + recorded):   # the supervisor records what it left alone
        click.echo(f"clusterctl: warning: {refusal}", err=True)
    status = run_status(found)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        states = ", ".join(f"{s} {r['state']}" for s, r in status["stages"].items())
        click.echo(f"run {found.id}: {states}")
