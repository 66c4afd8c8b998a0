"""`clusterctl data check FILE --model DIR`: validate a data set before submitting a run."""
from __future__ import annotations

import json

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
def check(file: str, model: str, max_length: int, as_json: bool) -> None:
    """Report every bad line (not JSON, unknown role, empty or untrainable conversation), what happens to
    over-long samples, and token counts. Exits 1 if anything would be dropped."""
    from clusterctl.training.data import check_dataset, load_tokenizer

    report = check_dataset(file, load_tokenizer(model), max_length)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)
    if not report["ok"]:
        raise SystemExit(1)


def _print_report(report: dict) -> None:
    for item in report["errors"]:
        click.echo(f"{report['file']}: {item['where']}: {item['reason']}")
    for item in report["dropped"]:
        click.echo(f"{report['file']}: {item['where']}: {item['tokens']} tokens, DROPPED: {item['reason']}")
    for item in report["truncated"]:
        click.echo(f"{report['file']}: {item['where']}: {item['tokens']} tokens > max_length: {item['action']}")
    t = report["tokens"]
    click.echo(f"{report['conversations']} conversations, {report['trainable']} trainable, "
               f"{len(report['errors'])} bad, {len(report['dropped'])} dropped, {len(report['truncated'])} truncated")
    click.echo(f"tokens: {t['total']} total, {t['trained']} trained; per conversation min {t['min']} "
               f"mean {t['mean']} p95 {t['p95']} max {t['max']} (max_length {report['max_length']})")
    click.echo("OK" if report["ok"] else "NOT OK: fix the lines above before training")
