"""The supervisor of the local and ssh backends: runs a run's stages in order, one process per
node, and records every transition in run.json. A failed node fails its stage, stops its
sibling nodes and cancels the stages after it. `python -m clusterctl.pipeline RUN_DIR`."""
from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from clusterctl.backends.base import SupervisedBackend, backend_for
from clusterctl.config import load_cluster
from clusterctl.errors import UserError
from clusterctl.run import FINISHED, Run

POLL_SECONDS = 0.2


class Cancelled(Exception):
    pass


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"exited with {code} ({signal.Signals(code - 128).name})"
    return f"exited with {code}"


class Supervisor:
    def __init__(self, run: Run):
        self.run = run
        self.backend: SupervisedBackend = backend_for(load_cluster(str(run.dir / "cluster.yaml")))
        self.cancel_requested = False

    def request_cancel(self, *_):
        self.cancel_requested = True

    def run_chain(self) -> int:
        data = self.run.read()
        chain = data["chain"]
        for index, stage in enumerate(chain):
            if data["stages"][stage]["state"] == "COMPLETED":
                continue   # a re-run resumes after what already finished
            try:
                ok = self.run_stage(stage, data["stages"][stage]["hosts"])
            except Cancelled:
                cancel_remaining(self.run, self.backend, reason="cancelled by the user")
                return 1
            if not ok:
                later = chain[index + 1:]
                mark_cancelled(self.run, later, reason=f"{stage} failed")
                return 1
        return 0

    def run_stage(self, stage: str, hosts: list) -> bool:
        run = self.run
        try:
            self.backend.check_stage(run, stage, hosts)
        except UserError as exc:
            run.set_stage(stage, state="FAILED", reason=str(exc))
            return False
        # Markers of an earlier attempt (pid, exit, endpoint) must not be mistaken for this one's.
        shutil.rmtree(run.state_dir(stage), ignore_errors=True)
        nodes = {rank: self.backend.start_node(run, stage, rank, host) for rank, host in enumerate(hosts)}
        run.set_stage(stage, state="RUNNING", node_states={str(r): "RUNNING" for r in nodes})
        node_states = {r: "RUNNING" for r in nodes}
        while True:
            if self.cancel_requested:
                self.stop_nodes(stage, hosts, [r for r, s in node_states.items() if s == "RUNNING"])
                raise Cancelled
            changed = False
            for rank, node in nodes.items():
                code = node.poll()
                if code is None or node_states[rank] != "RUNNING":
                    continue
                node_states[rank] = "COMPLETED" if code == 0 else "FAILED"
                changed = True
                if code != 0:
                    host = hosts[rank] or f"rank {rank}"
                    reason = f"node {rank} ({host}) {_describe_exit(code)}; see logs/{stage}/node-{rank:03d}.log"
                    node_states.update({r: "CANCELLED" for r, s in node_states.items() if s == "RUNNING"})
                    self.stop_nodes(stage, hosts, [r for r in nodes if r != rank])
                    run.set_stage(stage, state="FAILED", reason=reason, failed_nodes=[rank],
                                  exit_code=code, node_states={str(r): s for r, s in node_states.items()})
                    return False
            if changed:
                run.set_stage(stage, node_states={str(r): s for r, s in node_states.items()})
            if all(s == "COMPLETED" for s in node_states.values()):
                run.set_stage(stage, state="COMPLETED", exit_code=0)
                return True
            if stage == "deploy":
                self.record_endpoint()
            time.sleep(POLL_SECONDS)

    def record_endpoint(self) -> None:
        path = self.run.state_dir("deploy") / "endpoint.json"
        if path.exists() and not self.run.read()["stages"]["deploy"].get("endpoint"):
            endpoint = json.loads(path.read_text())
            self.run.set_stage("deploy", endpoint=endpoint["url"], served_model=endpoint.get("model"))

    def stop_nodes(self, stage: str, hosts: list, ranks: list[int]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(ranks)))) as pool:
            list(pool.map(lambda r: self.backend.kill_node(self.run, stage, r, hosts[r]), ranks))


def mark_cancelled(run: Run, stages: list[str], *, reason: str) -> None:
    def change(data):
        for stage in stages:
            record = data["stages"][stage]
            if record["state"] not in FINISHED:
                record.update(state="CANCELLED", reason=reason, ended=time.time())
    run.update(change)


def cancel_remaining(run: Run, backend: SupervisedBackend, *, reason: str) -> None:
    """Stop every node of every unfinished stage, then mark those stages CANCELLED."""
    data = run.read()
    unfinished = [s for s in data["chain"] if data["stages"][s]["state"] not in FINISHED]
    for stage in unfinished:
        hosts = data["stages"][stage]["hosts"]
        if any(run.state_dir(stage).glob("node-*.pid")):
            with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
                list(pool.map(lambda r: backend.kill_node(run, stage, r, hosts[r]), range(len(hosts))))
    mark_cancelled(run, unfinished, reason=reason)


def main(argv: list[str]) -> int:
    run = Run(argv[0])
    supervisor = Supervisor(run)
    signal.signal(signal.SIGTERM, supervisor.request_cancel)
    signal.signal(signal.SIGINT, supervisor.request_cancel)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # survives the terminal closing
    return supervisor.run_chain()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
