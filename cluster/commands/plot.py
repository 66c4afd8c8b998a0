"""`clusterctl plot [RUN]`: a PNG of the training stage's curves from its metrics.jsonl: loss (and eval
loss) and learning rate; for GRPO the reward mean and each reward function's mean, and KL; for DPO/SimPO
the preference margins and accuracies (cluster/plotpanels.py picks them)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from clusterctl.atomic import fsync_dir
from clusterctl.errors import UserError
from clusterctl.plotpanels import TRAINING_STAGES, Panel, panels, series


def read_metrics(path: Path) -> list[dict]:
    """One record per step; a resumed run may have rewritten steps, the last line for a step wins."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        raise UserError(f"no training metrics yet: {path} does not exist",
                        fix=f"wait for the {path.parent.name} stage's first optimizer step (`clusterctl status`)") from None
    by_step = {}
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):   # not JSON, not UTF-8, or nested too deeply
                if number == len(lines):        # being written right now
                    continue
                raise UserError(f"line {number} is not JSON", where=str(path)) from None
            if not (isinstance(record, dict) and _number(record.get("step")) and (
                    (_number(record.get("loss")) and _number(record.get("lr"))) or _number(record.get("eval_loss")))):
                raise UserError(f"line {number} is not a metrics record (step, loss, lr numbers; or step and "
                                f"eval_loss)", where=str(path))
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_stage(run_dir: Path) -> str:
    """The run's training stage: the one whose folder holds metrics.jsonl (sft when none does yet)."""
    for stage in TRAINING_STAGES:
        if (run_dir / stage / "metrics.jsonl").exists():
            return stage
    for stage in TRAINING_STAGES:
        if (run_dir / stage).is_dir():
            return stage
    return "sft"


def write_png(records: list[dict], chosen: list[Panel], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(chosen), 1, sharex=True, figsize=(8, 1.2 + 2.4 * len(chosen)), squeeze=False)
    for ax, panel in zip(axes[:, 0], chosen):
        for key in panel.keys:
            steps, values = series(records, key)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        if len(panel.keys) > 1:
            ax.legend(fontsize="small")
        ax.set_ylabel(panel.label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)
    fsync_dir(out.parent)


def _first_last(records: list[dict], key: str) -> str:
    _, values = series(records, key)
    return f", {key} {values[0]:.4f} -> {values[-1]:.4f}" if values else ""


@click.command("plot")
@click.argument("run", required=False)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG path (default: RUN/sft/loss.png; RUN/<kind>/metrics.png for grpo/dpo/simpo/ppo)")
@click.option("--runs-dir", default=None, help="Where runs live (default: $CLUSTERCTL_RUNS or ./runs).")
@click.option("--json", "as_json", is_flag=True, help="print what was written and every plotted series as JSON")
def command(run, out, runs_dir, as_json) -> None:
    """Plot the training curves of RUN (a run id or folder; default: the newest run): loss and learning
    rate per step, and for RL runs the rewards (per function), KL, or preference margins and accuracies."""
    from clusterctl.run import find_run

    found = find_run(runs_dir, run)
    stage = training_stage(found.dir)
    metrics = found.dir / stage / "metrics.jsonl"
    records = read_metrics(metrics)
    trained = [r for r in records if "loss" in r]
    if not trained:
        raise UserError("no optimizer step recorded yet", where=str(metrics))
    target = Path(out) if out else found.dir / stage / ("loss.png" if stage == "sft" else "metrics.png")
    chosen = panels(records)
    write_png(records, chosen, target, f"{found.dir.name}: {stage.upper()}")
    first, last = trained[0], trained[-1]
    evaluated = [r for r in records if r.get("eval_loss") is not None]
    plotted = {key: series(records, key) for panel in chosen for key in panel.keys}
    summary = {"png": str(target), "stage": stage, "steps": len(trained), "last_step": last["step"],
               "max_steps": last.get("max_steps"), "first_loss": first["loss"], "last_loss": last["loss"],
               "eval_loss": {r["step"]: r["eval_loss"] for r in evaluated},
               "panels": {panel.label: list(panel.keys) for panel in chosen},
               "series": {key: {"steps": steps, "values": values} for key, (steps, values) in plotted.items()}}
    text = f"wrote {target}: {len(trained)} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}"
    if evaluated:
        text += f", eval loss {evaluated[0]['eval_loss']:.4f} -> {evaluated[-1]['eval_loss']:.4f}"
    text += _first_last(records, "reward") + _first_last(records, "rewards/margins")
    click.echo(json.dumps(summary, indent=2) if as_json else text)
