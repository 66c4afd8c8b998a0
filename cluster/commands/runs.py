"""`clusterctl runs`: the runs under the runs folder, newest first, from run.json alone."""
from __future__ import annotations

import json

import click

from clusterctl.commands import options

STATES = ("pending", "running", "completed", "failed", "cancelled", "broken")   # run.json's stage states


@click.command("runs")
@options.cluster_file
@options.runs_dir
@click.option("--state", type=click.Choice(STATES, case_sensitive=False),
              help="Only runs with a stage in this state (broken: run.json unreadable).")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many (the newest).")
@options.as_json
def command(cluster_file, runs_dir, state, limit, as_json):
    """List runs, newest first: each stage's state (as last recorded; `clusterctl status RUN` refreshes
    one), the model, the endpoint while serving, and the age."""
    from pathlib import Path

    from clusterctl.config import load_cluster
    from clusterctl.run import default_runs_dir
    from clusterctl.runs_list import list_runs, table

    root = Path(runs_dir or (load_cluster(cluster_file).runs_dir if cluster_file else "") or default_runs_dir())
    runs = list_runs(root, state=state)[:limit]
    if as_json:
        click.echo(json.dumps({"runs_dir": str(root.resolve()), "runs": [r.to_dict() for r in runs]}, indent=2))
    elif runs:
        click.echo(table(runs))
    else:
        click.echo(f"no runs{f' with a {state} stage' if state else ''} under {root.resolve()}", err=True)
