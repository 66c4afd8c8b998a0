"""Publish the endpoint once vLLM is healthy: poll GET /health while the server process lives, then
write state/deploy/endpoint.json atomically ({"url", "model"}; the orchestrator copies it into
run.json). Fails fast when vLLM exits before it is ready, and at the deadline.

    python -m clusterctl.deploy.ready --health URL --pid PID --timeout S --url PUBLIC_URL --model NAME --out FILE
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from clusterctl.atomic import atomic_write_text
from clusterctl.procs import alive


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(health_url: str, *, pid: int, timeout: float, interval: float = 0.5) -> str:
    """'' once healthy, else why not."""
    started = time.monotonic()
    while not healthy(health_url):
        if not alive(pid):
            return f"vLLM (pid {pid}) exited before {health_url} answered: see its messages above"
        if time.monotonic() - started > timeout:
            return (f"{health_url} did not answer within {timeout:g} s (deploy.ready_timeout); "
                    "large models take long to load: raise ready_timeout, or read the log above")
        time.sleep(interval)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.ready", description=__doc__.split("\n")[0])
    parser.add_argument("--health", required=True, help="URL polled on this node, e.g. http://127.0.0.1:8000/health")
    parser.add_argument("--pid", type=int, required=True, help="the vLLM server process")
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--url", required=True, help="the endpoint as other machines reach it")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--out", required=True, help="endpoint.json to write")
    options = parser.parse_args(argv)
    started = time.monotonic()
    problem = wait_healthy(options.health, pid=options.pid, timeout=options.timeout)
    if problem:
        print(f"[clusterctl] {problem}", file=sys.stderr, flush=True)
        return 1
    atomic_write_text(options.out, json.dumps({"url": options.url, "model": options.model}) + "\n")
    print(f"[clusterctl] vLLM healthy after {time.monotonic() - started:.1f} s: {options.url} "
          f"serves {options.model!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
