"""clusterctl logs: per-node logs of a run, optionally followed."""
import time

import click

from clusterctl.commands import options


@click.command("logs")
@click.argument("run", required=False)
@click.option("--stage", type=click.Choice(["sft", "grpo", "dpo", "simpo", "ppo", "convert", "deploy"]), help="One stage (default: all).")
@click.option("--node", type=click.IntRange(min=0), help="One node rank (default: all).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C to stop).")
@options.runs_dir
def command(run, stage, node, follow, runs_dir):
    """Print RUN's logs, each line prefixed with its stage and node."""
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    stages = [stage] if stage else found.read()["chain"]
    offsets: dict = {}
    try:
        while True:
            for name in stages:
                paths = sorted(found.log_dir(name).glob("node-*.log"))
                for path in paths:
                    if node is not None and path.name != f"node-{node:03d}.log":
                        continue
                    with open(path, "rb") as handle:
                        handle.seek(offsets.get(path, 0))
                        chunk = handle.read()
                    complete = chunk[: chunk.rfind(b"\n") + 1] if follow else chunk
                    offsets[path] = offsets.get(path, 0) + len(complete)
                    prefix = f"{name}/{path.stem}: "
                    for line in complete.decode(errors="replace").splitlines():
                        click.echo(prefix + line)
            if not follow:
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
