"""clusterctl cancel: stop every unfinished stage of a run, dependents included."""
import json

import click

from clusterctl.commands import options


@click.command("cancel")
@click.argument("run")
@options.runs_dir
@options.as_json
def command(run, runs_dir, as_json):
    """Cancel RUN: stop its nodes on every host and mark unfinished stages CANCELLED."""
    from clusterctl.backends.base import backend_for
    from clusterctl.commands.status import run_status
    from clusterctl.config import load_cluster
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    backend_for(load_cluster(str(found.dir / "cluster.yaml"))).cancel(found)
    status = run_status(found)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        states = ", ".join(f"{s} {r['state']}" for s, r in status["stages"].items())
        click.echo(f"run {found.id}: {states}")
