"""clusterctl retry: submit a run's unfinished stages again, in the same run folder."""
import click

from clusterctl.commands import options
from clusterctl.commands.submit import finish


@click.command("retry")
@click.argument("run")
@options.runs_dir
@options.detach
@options.as_json
def command(run, runs_dir, detach, as_json):
    """Run RUN's stages that did not complete again; SFT resumes from its last complete checkpoint."""
    from clusterctl.backends.base import backend_of
    from clusterctl.errors import UserError
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    backend = backend_of(found)
    data = backend.refresh(found)
    todo = [s for s in data["chain"] if data["stages"][s]["state"] != "COMPLETED"]
    busy = [s for s in todo if data["stages"][s]["state"] in ("PENDING", "RUNNING") and not data.get("dry_run")]
    if busy:
        raise UserError(f"run {found.id} is still active ({', '.join(busy)})",
                        fix=f"wait for it, or `clusterctl cancel {found.id}` first")
    if not todo:
        raise UserError(f"every stage of run {found.id} already completed")

    found.reset(todo)
    backend.submit(found, todo)
    finish(found, dry_run=False, detach=detach, as_json=as_json)
