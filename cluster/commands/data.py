"""`clusterctl data check FILE --model DIR`: validate a data set before submitting a run."""
from __future__ import annotations

import json
import os

import click

from clusterctl.training.config import BUILTIN_TINY_MODEL


@click.group("data", help="Inspect training data sets.")
def command() -> None:
    pass


@command.command("check")
@click.argument("file")
@click.option("--model", default=BUILTIN_TINY_MODEL, show_default=True,
              help="model folder whose tokenizer renders the data")
@click.option("--max-length", type=click.IntRange(min=1), default=32768, show_default=True,
              help="the job's max_length: longer samples are truncated")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--kind", type=click.Choice(["sft", "grpo", "dpo", "simpo", "ppo"]), default="sft", show_default=True,
              help="the job kind the data is for: grpo wants prompts, dpo/simpo prompt/chosen/rejected pairs")
def check(file: str, model: str, max_length: int, as_json: bool, kind: str) -> None:
    """Report every bad line (not JSON, unknown role, empty or untrainable conversation), what happens to
    over-long samples, the chat format the model trains in, and token counts (the trainer's data cache
    builder runs the same scan). Exits 1 if anything would be dropped."""
    if kind != "sft":
        _check_rl(file, kind, as_json)
        return
    from clusterctl.training.data import check_dataset, load_tokenizer

    report = check_dataset(file, load_tokenizer(model), max_length, workers=os.cpu_count() or 1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if not report["ok"]:
        raise SystemExit(1)


def _check_rl(file: str, kind: str, as_json: bool) -> None:
    """Per-line errors of a GRPO prompt file or a DPO/SimPO preference file (training/rl/data.py)."""
    from clusterctl.training.rl.data import check_file

    report = check_file(file, kind)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for item in report["errors"]:
            click.echo(f"{report['file']}: {item['where']}: {item['reason']}")
        click.echo(f"{report['rows']} {kind} rows, {len(report['errors'])} bad; columns every row has: "
                   f"{', '.join(report['columns']) or 'none'}")
        click.echo("OK" if report["ok"] else "NOT OK: fix the lines above before training")
    if not report["ok"]:
        raise SystemExit(1)


def _print_report(report: dict) -> None:
    for item in report["errors"]:
        click.echo(f"{report['file']}: {item['where']}: {item['reason']}")
    for item in report["dropped"]:
        click.echo(f"{report['file']}: {item['where']}: {item['tokens']} tokens, DROPPED: {item['reason']}")
    for item in report["truncated"]:
        click.echo(f"{report['file']}: {item['where']}: {item['tokens']} tokens > max_length: {item['action']}")
    click.echo(f"format: {report['format']}")
    t = report["tokens"]
    click.echo(f"{report['conversations']} conversations, {report['trainable']} trainable, "
               f"{len(report['errors'])} bad, {len(report['dropped'])} dropped, {len(report['truncated'])} truncated")
    click.echo(f"tokens: {t['total']} total, {t['trained']} trained; per conversation min {t['min']} "
               f"mean {t['mean']} p95 {t['p95']} max {t['max']} (max_length {report['max_length']})")
    if not report["conversations"] and not report["errors"]:
        click.echo("NOT OK: the file holds no conversations (one JSON conversation per line)")
    else:
        click.echo("OK" if report["ok"] else "NOT OK: fix the lines above before training")
