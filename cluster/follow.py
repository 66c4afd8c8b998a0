"""Follow a run in the foreground (the local backend's submit): stage and node states, training
step and loss, then the health check of the endpoint with a sample answer."""
from __future__ import annotations

import json
import time

import click

from clusterctl.backends.base import backend_of
from clusterctl.run import FINISHED, Run


def last_metrics(run: Run, stage: str = "sft") -> dict | None:
    path = run.stage_dir(stage) / "metrics.jsonl"
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def describe(run: Run, stage: str, record: dict) -> str:
    text = f"{stage:<8} {record['state']:<10}"
    nodes = record.get("node_states") or {}
    if nodes:
        counts: dict[str, int] = {}
        for state in nodes.values():
            counts[state] = counts.get(state, 0) + 1
        text += " nodes " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    if stage in ("sft", "grpo", "dpo", "simpo", "ppo") and record["state"] == "RUNNING":
        metrics = last_metrics(run, stage)
        if metrics:
            text += (f" | step {metrics.get('step')}/{metrics.get('max_steps')} loss {metrics.get('loss', 0):.4f}"
                     f" lr {metrics.get('lr', 0):.2e}")
            for key in ("reward", "rewards/margins"):       # grpo; dpo / simpo
                if key in metrics:
                    text += f" {key.split('/')[-1]} {metrics[key]:.3f}"
    if record.get("endpoint"):
        text += f" | {record['endpoint']}"
    if record.get("reason") and record["state"] in ("FAILED", "CANCELLED"):
        text += f" | {record['reason']}"
    return text


def tail(path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def follow(run: Run, *, health_timeout: float = 600.0) -> int:
    """Print progress until the chain fails, completes, or its endpoint answers; return an exit code."""
    backend = backend_of(run)
    shown: dict[str, str] = {}
    last_print = 0.0
    while True:
        data = backend.refresh(run)
        for stage in data["chain"]:
            line = describe(run, stage, data["stages"][stage])
            changed = shown.get(stage, "").split("|")[0] != line.split("|")[0]
            if changed or (line != shown.get(stage) and time.time() - last_print > 5):
                click.echo(f"[{time.strftime('%H:%M:%S')}] {line}", err=True)
                shown[stage] = line
                last_print = time.time()
        states = {s: data["stages"][s]["state"] for s in data["chain"]}
        failed = [s for s, state in states.items() if state == "FAILED"]
        if failed:
            record = data["stages"][failed[0]]
            click.echo(f"\n{failed[0]} FAILED: {record.get('reason', '')}", err=True)
            for rank in record.get("failed_nodes", []):
                click.echo(f"--- last lines of logs/{failed[0]}/node-{rank:03d}.log ---\n"
                           f"{tail(run.log_path(failed[0], rank))}", err=True)
            click.echo(f"Inspect: clusterctl logs {run.id} --stage {failed[0]}   "
                       f"Retry: clusterctl retry {run.id}", err=True)
            return 1
        if all(state in FINISHED for state in states.values()):
            return 0 if all(state == "COMPLETED" for state in states.values()) else 1
        deploy = data["stages"].get("deploy", {})
        if deploy.get("endpoint"):
            return report_endpoint(run, deploy, timeout=health_timeout)
        time.sleep(0.5)


def report_endpoint(run: Run, deploy: dict, *, timeout: float) -> int:
    from clusterctl.commands.health import print_check
    from clusterctl.health import Endpoint, check_endpoint
    from clusterctl.sample import sample_question, verdict

    endpoint = Endpoint(url=deploy["endpoint"], model=deploy.get("served_model") or "")
    question = sample_question(run.dir)
    checks = check_endpoint(endpoint, timeout=timeout, prompt=question.prompt)
    for check in checks:
        print_check(check, err=True)
        for line in verdict(question, check.answer) if check.ok and check.name.startswith("POST") else ():
            click.echo(line, err=True)
    ok = len(checks) == 3 and all(check.ok for check in checks)
    click.echo(f"\nendpoint: {deploy['endpoint']}  (served model {endpoint.model})", err=True)
    click.echo(f"stop it:  clusterctl cancel {run.id}", err=True)
    return 0 if ok else 1
