"""`clusterctl health RUN|URL`: prove a deployment answers (and optionally take a little load)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import urllib.parse
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
        deploy = _recorded_deploy(run_dir / "run.json")
        if deploy.get("endpoint"):
            return Endpoint(url=_url(deploy["endpoint"], run_dir / "run.json"),
                            model=_text(deploy.get("served_model"), run_dir / "run.json"))
        record = _read_json(run_dir / "state" / "deploy" / "endpoint.json")
        if record is not None:
            where = run_dir / "state" / "deploy" / "endpoint.json"
            if not isinstance(record, dict) or "url" not in record:
                raise UserError('not an endpoint record: expected {"url": ..., "model": ...}', where=str(where),
                                fix="the deploy head rewrites it once vLLM is healthy; redeploy, or pass the URL")
            return Endpoint(url=_url(record["url"], where), model=_text(record.get("model"), where))
        state = deploy.get("state", "")
        remaining = deadline - time.monotonic()
        if state in ("COMPLETED", "FAILED", "CANCELLED") or remaining <= 0:
            why = f"its deploy stage is {state}" if state else "no stages.deploy.endpoint, no state/deploy/endpoint.json"
            raise UserError(f"{run_dir} has no deploy endpoint after {wait_s:g} s ({why})",
                            fix=f"check the deploy stage with `clusterctl status {run_dir.name}`, or pass the URL")
        time.sleep(min(1.0, remaining))


def _read_json(path: Path) -> object:
    """A JSON file's value, None when it does not exist; a UserError naming it when it cannot be read."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"cannot read it: {error.strerror}", where=str(path)) from None
    except (ValueError, RecursionError) as error:
        raise UserError(f"not valid JSON ({str(error)[:120]})", where=str(path),
                        fix="the file is damaged; pass the endpoint's URL instead") from None


def _recorded_deploy(run_json: Path) -> dict:
    """run.json's stages.deploy ({} when the run has none yet)."""
    record = _read_json(run_json)
    if record is None:
        return {}
    stages = record.get("stages", {}) if isinstance(record, dict) else None
    deploy = stages.get("deploy") if isinstance(stages, dict) else None
    if not isinstance(deploy, dict) and not (deploy is None and isinstance(stages, dict)):
        raise UserError("not a run record: stages.deploy is not an object", where=str(run_json),
                        fix="the file is damaged; pass the endpoint's URL instead")
    return deploy or {}


def _text(value: object, where: Path) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise UserError(f"expected a served model name, found {value!r:.80}", where=str(where))


def _url(value: object, where: Path | str) -> str:
    """An http(s)://host:port URL, or a UserError naming where it came from."""
    try:
        parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
        ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"not an endpoint URL: {value!r:.120}", where=str(where),
                        fix="an endpoint is http://HOST:PORT (or https://)")
    return str(value).rstrip("/")


def resolve_target(target: str, runs_dir: str | None, *, wait_s: float = 0.0) -> Endpoint:
    if target.startswith(("http://", "https://")):
        return Endpoint(url=_url(target, "RUN|URL"))
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
    label = f"{check.name} ({check.model})" if check.model else check.name
    click.echo(f"{mark}  {label:<27} {check.latency_s * 1000:8.1f} ms  {check.detail}{tries}", err=err)
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
              help="Wall-clock limit in seconds of the whole check, retries while the server starts included "
                   "(and of each load-test request).")
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
    """Check a deployment: GET /health, GET /v1/models, POST /v1/chat/completions (with curl lines); a chat
    request per served name when there are several (LoRA adapters served by name).

    RUN is a run id or run folder (its deploy endpoint is used); URL is http://HOST:PORT."""
    if not math.isfinite(timeout) or timeout <= 0:
        raise UserError(f"--timeout must be a number of seconds above 0, not {timeout:g}", fix="e.g. --timeout 60")
    deadline = time.monotonic() + timeout
    endpoint = resolve_target(target, runs_dir, wait_s=timeout)
    endpoint.model = model or endpoint.model
    endpoint.api_key = read_api_key(api_key_file)
    if not as_json:
        click.echo(f"endpoint {endpoint.url}" + (f"  model {endpoint.model}" if endpoint.model else ""))
    checks = check_endpoint(endpoint, timeout=max(deadline - time.monotonic(), 0.001), each_model=True)
    ok = all(check.ok for check in checks) and len(checks) >= 3
    load = None
    if ok and n_requests:
        load = load_test(endpoint, requests=n_requests, concurrency=concurrency, timeout=timeout)
        ok = load.passed
    if as_json:
        models = {check.model: check.ok for check in checks if check.model}   # each served name, when several
        click.echo(json.dumps({"url": endpoint.url, "model": endpoint.model, "ok": ok, "models": models,
                               "checks": [dataclasses.asdict(check) for check in checks],
                               "load": load.as_dict() if load else None}, indent=2))
    else:
        for check in checks:
            print_check(check)
        if load:
            _print_load(load)
        for failed in (check for check in checks if not check.ok):
            model = f" for {failed.model}" if failed.model else ""
            click.echo(f"clusterctl: error: {endpoint.url} failed {failed.name}{model}: {failed.detail}", err=True)
    if not ok:
        raise SystemExit(1)
