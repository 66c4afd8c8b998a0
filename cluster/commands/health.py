"""`clusterctl health RUN|URL`: prove a deployment answers (and optionally take a little load)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import click

from clusterctl.errors import UserError
from clusterctl.health import Check, Endpoint, LoadResult, check_endpoint, load_test


def endpoint_of_run(run_dir: Path, *, wait_s: float = 0.0) -> Endpoint:
    """The endpoint a deploy recorded: run.json `stages.deploy` (endpoint URL + served_model), else
    state/deploy/endpoint.json (written by the deploy head as soon as vLLM is healthy). While the deploy
    stage is still starting, wait up to `wait_s` for it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            deploy = (json.loads((run_dir / "run.json").read_text()).get("stages") or {}).get("deploy") or {}
        except (OSError, ValueError):
            deploy = {}
        if deploy.get("endpoint"):
            return Endpoint(url=deploy["endpoint"], model=deploy.get("served_model") or "")
        try:
            record = json.loads((run_dir / "state" / "deploy" / "endpoint.json").read_text())
            return Endpoint(url=record["url"], model=record.get("model", ""))
        except FileNotFoundError:
            pass
        state = deploy.get("state", "")
        if state in ("COMPLETED", "FAILED", "CANCELLED") or time.monotonic() >= deadline:
            why = f"its deploy stage is {state}" if state else "no stages.deploy.endpoint, no state/deploy/endpoint.json"
            raise UserError(f"{run_dir} has no deploy endpoint after {wait_s:g} s ({why})",
                            fix=f"check the deploy stage with `clusterctl status {run_dir.name}`, or pass the URL")
        time.sleep(1.0)


def resolve_target(target: str, runs_dir: str | None, *, wait_s: float = 0.0) -> Endpoint:
    if target.startswith(("http://", "https://")):
        return Endpoint(url=target.rstrip("/"))
    if Path(target).is_dir():
        return endpoint_of_run(Path(target), wait_s=wait_s)
    from clusterctl.run import find_run
    return endpoint_of_run(find_run(runs_dir, target).dir, wait_s=wait_s)


def read_api_key(api_key_file: str | None) -> str:
    """The key from --api-key-file, else $VLLM_API_KEY (how the deploy hands it to vLLM)."""
    if api_key_file:
        try:
            return Path(api_key_file).expanduser().read_text().strip()
        except OSError as error:
            raise UserError(f"cannot read the API key: {error}", where=api_key_file) from None
    return os.environ.get("VLLM_API_KEY", "")


def print_check(check: Check, *, err: bool = False) -> None:
    """One check as lines (also used by `submit`'s foreground follow, on stderr there)."""
    mark = click.style("PASS", fg="green") if check.ok else click.style("FAIL", fg="red")
    tries = f"  ({check.attempts} tries)" if check.attempts > 1 else ""
    click.echo(f"{mark}  {check.name:<27} {check.latency_s * 1000:8.1f} ms  {check.detail}{tries}", err=err)
    if check.reasoning:
        click.echo(f"      reasoning: {check.reasoning}", err=err)
    if check.ok and check.name.startswith("POST"):
        note = "" if check.answer else "  (the reply was only whitespace)"
        click.echo(f"      answer: {check.answer!r}{note}", err=err)
    click.echo(f"      {check.curl}", err=err)


def _print_load(load: LoadResult) -> None:
    mark = click.style("PASS", fg="green") if load.passed else click.style("FAIL", fg="red")
    click.echo(f"{mark}  load: {load.requests} requests, concurrency {load.concurrency}: {load.ok} ok, "
               f"{load.requests - load.ok} failed in {load.wall_s:.2f} s; {load.requests_per_s:.2f} req/s, "
               f"{load.tokens_per_s:.1f} tokens/s, p50 {load.percentile(50) * 1000:.0f} ms, "
               f"p95 {load.percentile(95) * 1000:.0f} ms")
    for error in load.errors[:3]:
        click.echo(f"      {error}")


@click.command("health")
@click.argument("target", metavar="RUN|URL")
@click.option("--timeout", default=60.0, show_default=True, type=float,
              help="Seconds to keep retrying while the server starts.")
@click.option("--requests", "n_requests", default=0, type=click.IntRange(min=0),
              help="Then send this many chat requests as a load smoke test.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Requests in flight during the load test.")
@click.option("--model", default="", help="Served model name expected (default: the run's, or the first listed).")
@click.option("--api-key-file", type=click.Path(dir_okay=False), help="File holding the API key "
              "(default: $VLLM_API_KEY).")
@click.option("--runs-dir", default=None, help="Where runs live (default: $CLUSTERCTL_RUNS or ./runs).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
def command(target, timeout, n_requests, concurrency, model, api_key_file, runs_dir, as_json):
    """Check a deployment: GET /health, GET /v1/models, POST /v1/chat/completions (with curl lines).

    RUN is a run id or run folder (its deploy endpoint is used); URL is http://HOST:PORT."""
    started = time.monotonic()
    endpoint = resolve_target(target, runs_dir, wait_s=timeout)
    endpoint.model = model or endpoint.model
    endpoint.api_key = read_api_key(api_key_file)
    if not as_json:
        click.echo(f"endpoint {endpoint.url}" + (f"  model {endpoint.model}" if endpoint.model else ""))
    checks = check_endpoint(endpoint, timeout=max(timeout - (time.monotonic() - started), 1.0))
    ok = all(check.ok for check in checks) and len(checks) == 3
    load = None
    if ok and n_requests:
        load = load_test(endpoint, requests=n_requests, concurrency=concurrency, timeout=max(timeout, 30.0))
        ok = load.passed
    if as_json:
        click.echo(json.dumps({"url": endpoint.url, "model": endpoint.model, "ok": ok,
                               "checks": [dataclasses.asdict(check) for check in checks],
                               "load": load.as_dict() if load else None}, indent=2))
    else:
        for check in checks:
            print_check(check)
        if load:
            _print_load(load)
    if not ok:
        raise SystemExit(1)
