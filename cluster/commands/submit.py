"""clusterctl submit: render a run and submit its chain of stages."""
import json

import click

from clusterctl.commands import options

_SET_FILES = {"--set": "job.yaml", "--set-cluster": "cluster.yaml"}


@click.command("submit")
@click.argument("first_stage", type=click.Choice(["sft", "grpo", "dpo", "simpo", "ppo", "convert", "deploy"]), default="sft")
@click.option("--nodes", type=click.IntRange(min=1), help="Nodes of the training stage (overrides the job spec).")
@click.option("--stages", "stages_text", help="Stages to chain, e.g. sft or sft,convert (default: from FIRST_STAGE on).")
@click.option("--dry-run", is_flag=True, help="Render the run folder, submit nothing.")
@click.option("--force", is_flag=True, help="Submit even if the memory planner says SFT will not fit.")
@options.run_options
def command(first_stage, nodes, stages_text, dry_run, force, cluster_file, job_file, set_job, set_cluster, runs_dir,
            detach, as_json):
    """Render one script per node for each stage and submit the chain (sft -> convert -> deploy; `grpo`,
    `dpo`, `simpo` or `ppo` train instead of sft, on their built-in example job when no --job is given).

    Prints the run id and folder. On the local backend it follows the run in the foreground
    until the endpoint answers (Ctrl-C stops following; the run goes on)."""
    from clusterctl.submit import submit

    run = submit(first_stage=first_stage, stages_text=stages_text, sft_nodes=nodes, cluster_file=cluster_file,
                 job_file=job_file, runs_dir=runs_dir, dry_run=dry_run, force=force, job_set=set_job,
                 cluster_set=set_cluster)
    finish(run, dry_run=dry_run, detach=detach, as_json=as_json)


def finish(run, *, dry_run: bool, detach: bool, as_json: bool) -> None:
    """Print what was submitted; on the local backend follow it to the end (shared by the stage verbs)."""
    data = run.read()
    if as_json:
        click.echo(json.dumps({"run": run.id, "dir": str(run.dir)}))
    else:
        click.echo(f"run {run.id}: {run.dir}")
        scripts = sum(len(list(run.stage_dir(s).glob("node-*.sh"))) for s in data["chain"])
        click.echo(f"  {' -> '.join(data['chain'])} on the {data['backend']} backend; {scripts} node scripts"
                   + ("; dry run: nothing submitted" if dry_run else ""))
        click.echo(f"  node interpreter: {data['node_python']}")
        for flag, assignments in (data.get("set") or {}).items():
            click.echo(f"  {flag}: {', '.join(assignments)} (the result is in {run.dir / _SET_FILES[flag]})")
    from clusterctl.backends.base import backend_of

    if dry_run or detach or not backend_of(run).follows_in_foreground:
        if not dry_run and not as_json:
            click.echo(f"  follow it: clusterctl status {run.id}; clusterctl logs {run.id} --follow")
        return
    from clusterctl.follow import follow

    try:
        code = follow(run)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the run goes on. clusterctl status {run.id} / "
                   f"clusterctl cancel {run.id}", err=True)
        code = 130
    raise SystemExit(code)
