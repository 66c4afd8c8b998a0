"""Benchmark: time to a healthy endpoint with clusterctl against the same steps done by hand, in one run.

- one node: `clusterctl deploy --model M` (local backend; the time until it publishes the endpoint)
  against `vllm serve M` with the same flags and a /health poll every 0.2 s;
- two nodes (each in its own network namespace, on CPU): the rendered deploy node scripts (Ray head,
  worker, readiness gate, vLLM on node 0) against `ray start --head`, `ray start --address`, `vllm serve`
  typed one after another, then the same /health poll;
- the load smoke test: `clusterctl health URL --requests N --concurrency C` against N curl calls
  through `xargs -P C` on the same server.

Prints one table with ratios. Tiny DeepSeek-V3 on vLLM's CPU build, --enforce-eager, 1 GiB KV cache.
Run as root (namespaces):  .venv/bin/python bench/deploy/bench_deploy.py [--repeat 1] [--requests 32]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.deploy.conftest import NodeScripts, free_port, render_deploy  # noqa: E402
from tests.fixtures.netns import NetnsHosts  # noqa: E402

PY = sys.executable
BIN = os.path.dirname(PY)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1",
       "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
SERVED = "tiny-r1"
# The flags clusterctl's deploy renders for this job on this vLLM (CPU node): the by-hand runs use the same.
FLAGS = ["--served-model-name", SERVED, "--max-model-len", "512", "--reasoning-parser", "deepseek_r1",
         "--enforce-eager"]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def poll(check, timeout: float = 600, what: str = "", alive=lambda: True) -> float:
    """Seconds until check() holds (polled every 0.2 s)."""
    start = time.monotonic()
    while not check():
        if not alive():
            sys.exit(f"failed while waiting for {what}")
        if time.monotonic() - start > timeout:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def stop(proc: subprocess.Popen, sig=signal.SIGINT, grace: float = 30) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def by_hand_one_node(model: Path) -> float:
    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen([f"{BIN}/vllm", "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *FLAGS],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        poll(lambda: healthy(f"http://127.0.0.1:{port}"), what="vllm serve", alive=lambda: proc.poll() is None)
        return time.monotonic() - start
    finally:
        stop(proc)


def clusterctl(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([PY, "-m", "clusterctl.cli", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=timeout)
    if result.returncode:
        sys.exit(f"clusterctl {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return result


def clusterctl_one_node(model: Path, work: Path, *, then=None) -> float:
    """`clusterctl deploy --model M` until it publishes the endpoint; `then(url)` runs before the cancel."""
    port = free_port()
    (work / "cluster.yaml").write_text(f"backend: local\nports: {{vllm: {port}}}\n")
    (work / "job.yaml").write_text(f"name: bench\ndeploy: {{nodes: 1, served_model_name: {SERVED}, "
                                   "max_model_len: 512, host: 127.0.0.1, ready_timeout: 600}\n")
    start = time.monotonic()
    submitted = clusterctl("deploy", "--model", model, "--cluster", work / "cluster.yaml", "--job", work / "job.yaml",
                           "--runs-dir", work / "runs", "--detach", "--json")
    run = json.loads(submitted.stdout)
    run_dir = Path(run["dir"])
    endpoint = run_dir / "state" / "deploy" / "endpoint.json"
    try:
        poll(endpoint.exists, what="clusterctl deploy")
        elapsed = time.monotonic() - start
        if then:
            then(json.loads(endpoint.read_text())["url"])
        return elapsed
    finally:
        clusterctl("cancel", run["run"], "--runs-dir", work / "runs", timeout=120)


def by_hand_two_nodes(model: Path) -> float:
    hosts = NetnsHosts(2).start()
    temp = tempfile.mkdtemp(prefix="ccray", dir="/tmp")
    port, head = free_port(), hosts.addrs[0]
    server = None
    try:
        start = time.monotonic()
        for rank, extra in ((0, ["--head", "--port", "6380"]), (1, ["--address", f"{head}:6380"])):
            subprocess.run(hosts.wrap(rank + 1, [f"{BIN}/ray", "start", *extra, "--node-ip-address", hosts.addrs[rank],
                                                 "--temp-dir", f"{temp}/n{rank}", "--disable-usage-stats"]),
                           env=ENV, check=True, capture_output=True, timeout=300)
        server = subprocess.Popen(hosts.wrap(1, [f"{BIN}/vllm", "serve", str(model), "--host", "0.0.0.0",
                                                 "--port", str(port), *FLAGS]),
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        poll(lambda: healthy(f"http://{head}:{port}"), what="vllm serve (2 nodes)",
             alive=lambda: server.poll() is None)
        return time.monotonic() - start
    finally:
        if server:
            stop(server)
        hosts.close()             # kills the Ray daemons left in the namespaces
        shutil.rmtree(temp, ignore_errors=True)


def clusterctl_two_nodes(model: Path, work: Path) -> float:
    hosts = NetnsHosts(2).start()
    temp = tempfile.mkdtemp(prefix="ccray", dir="/tmp")
    run_dir = work / f"run2-{time.time_ns()}"
    run_dir.mkdir()
    try:
        run = render_deploy(run_dir, model=model, nodes=2, hosts=hosts.names, head=hosts.addrs[0], ray_port=6380,
                            vllm_port=free_port(), ray_temp_dir=temp, served_model_name=SERVED, max_model_len=512,
                            ready_timeout=600)
        nodes = NodeScripts(run, 2, wrap=lambda rank, argv: hosts.wrap(rank + 1, argv))
        try:
            start = time.monotonic()
            procs = [nodes.start(0), nodes.start(1)]
            poll((run.state_dir("deploy") / "endpoint.json").exists, what="rendered 2-node deploy",
                 alive=lambda: all(p.poll() is None for p in procs))
            return time.monotonic() - start
        finally:
            nodes.close()
    finally:
        hosts.close()
        shutil.rmtree(temp, ignore_errors=True)


def load_numbers(url: str, requests: int, concurrency: int, out: dict) -> None:
    """The health command's load smoke test, then the same requests by hand with curl through xargs -P."""
    report = json.loads(clusterctl("health", url, "--requests", requests, "--concurrency", concurrency, "--json",
                                   timeout=600).stdout)
    out["ours"] = report["load"]
    body = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
                       "max_tokens": 32, "temperature": 0})
    start = time.monotonic()
    subprocess.run(["xargs", "-P", str(concurrency), "-I{}", "curl", "-sS", "-o", "/dev/null", "-X", "POST",
                    f"{url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
                   input="\n".join(map(str, range(requests))) + "\n", text=True, check=True, timeout=600)
    out["by_hand_wall_s"] = time.monotonic() - start


def measure(results: dict, key: str, variant, *args, **kwargs) -> None:
    results[key].append(variant(*args, **kwargs))
    print(f"  {key}: {results[key][-1]:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each variant (alternating)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--skip-two-nodes", action="store_true")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        from clusterctl.training.tiny import build_tiny_model
        model = build_tiny_model(work / "model")
        results: dict[str, list[float]] = {k: [] for k in ("hand1", "ours1", "hand2", "ours2")}
        load: dict = {}
        for i in range(options.repeat):
            print(f"round {i + 1}/{options.repeat} ...", flush=True)
            then = (lambda url: load_numbers(url, options.requests, options.concurrency, load)) if i == 0 else None
            pair = [lambda: measure(results, "hand1", by_hand_one_node, model),
                    lambda then=then: measure(results, "ours1", clusterctl_one_node, model, work, then=then)]
            if not options.skip_two_nodes:
                pair += [lambda: measure(results, "hand2", by_hand_two_nodes, model),
                         lambda: measure(results, "ours2", clusterctl_two_nodes, model, work)]
            for variant in (pair if i % 2 == 0 else pair[::-1]):     # alternate the order against drift
                variant()
        print()
        print(f"{'time to healthy (s), median of ' + str(options.repeat):<44} {'by hand':>9} {'clusterctl':>11} {'ratio':>7}")
        rows = [("1 node: vllm serve / clusterctl deploy", "hand1", "ours1")]
        if not options.skip_two_nodes:
            rows.append(("2 nodes: ray x2 + vllm serve / node scripts", "hand2", "ours2"))
        for label, hand, ours in rows:
            h, o = statistics.median(results[hand]), statistics.median(results[ours])
            print(f"{label:<44} {h:9.1f} {o:11.1f} {o / h:7.2f}")
        ours = load["ours"]
        print()
        print(f"load smoke ({options.requests} chat requests, concurrency {options.concurrency}, 32 tokens max)")
        print(f"{'':<44} {'xargs+curl':>9} {'clusterctl':>11} {'ratio':>7}")
        print(f"{'wall (s)':<44} {load['by_hand_wall_s']:9.2f} {ours['wall_s']:11.2f} "
              f"{ours['wall_s'] / load['by_hand_wall_s']:7.2f}")
        print(f"clusterctl health: {ours['ok']}/{ours['requests']} ok, {ours['requests_per_s']:.2f} req/s, "
              f"{ours['tokens_per_s']:.1f} tokens/s, p50 {ours['p50_s'] * 1000:.0f} ms, p95 {ours['p95_s'] * 1000:.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
