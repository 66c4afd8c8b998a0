"""`clusterctl plot [RUN]`: a PNG of the SFT loss and learning rate, from the run's sft/metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import click

from clusterctl.atomic import fsync_dir
from clusterctl.errors import UserError


def read_metrics(path: Path) -> list[dict]:
    """One record per step; a resumed run may have rewritten steps, the last line for a step wins."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"no training metrics yet: {path} does not exist",
                        fix="wait for the sft stage's first optimizer step (`clusterctl status`)") from None
    by_step = {}
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):        # being written right now
                    continue
                raise UserError(f"line {number} is not JSON", where=str(path)) from None
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def write_png(records: list[dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    loss_ax.plot(steps, [r["loss"] for r in records], marker="." if len(steps) < 50 else None)
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(title)
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("optimizer step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)
    fsync_dir(out.parent)


@click.command("plot")
@click.argument("run", required=False)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG path (default: RUN/sft/loss.png)")
@click.option("--runs-dir", default=None, help="Where runs live (default: $CLUSTERCTL_RUNS or ./runs).")
@click.option("--json", "as_json", is_flag=True, help="print what was written as JSON")
def command(run, out, runs_dir, as_json) -> None:
    """Plot loss and learning rate per step of RUN (a run id or folder; default: the newest run)."""
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    records = read_metrics(found.dir / "sft" / "metrics.jsonl")
    if not records:
        raise UserError("no optimizer step recorded yet", where=str(found.dir / "sft" / "metrics.jsonl"))
    target = Path(out) if out else found.dir / "sft" / "loss.png"
    write_png(records, target, f"{found.dir.name}: SFT")
    last = records[-1]
    summary = {"png": str(target), "steps": len(records), "last_step": last["step"], "max_steps": last.get("max_steps"),
               "first_loss": records[0]["loss"], "last_loss": last["loss"]}
    click.echo(json.dumps(summary, indent=2) if as_json else
               f"wrote {target}: {len(records)} steps, loss {records[0]['loss']:.4f} -> {last['loss']:.4f}")
