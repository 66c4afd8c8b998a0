"""The supervisor of the local and ssh backends: runs a run's stages in order, one process per
node, and records every transition in run.json. A failed node fails its stage, stops its
sibling nodes and cancels the stages after it. `python -m clusterctl.pipeline RUN_DIR`."""
from __future__ import annotations

import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from clusterctl.backends.base import SupervisedBackend, backend_of
from clusterctl.errors import UserError
from clusterctl.restarts import entry as restart_entry
from clusterctl.restarts import read_faults
from clusterctl.run import Run, StageState, recorded_endpoint, unfinished

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
        backend = backend_of(run)
        assert isinstance(backend, SupervisedBackend)
        self.backend: SupervisedBackend = backend
        self.cancel_requested = False

    def request_cancel(self, *_):
        self.cancel_requested = True

    def run_chain(self) -> int:
        data = self.run.read()
        chain = data["chain"]
        for index, stage in enumerate(chain):
            if data["stages"][stage]["state"] == StageState.COMPLETED:
                continue   # a re-run resumes after what already finished
            try:
                ok = self.run_stage(stage, data["stages"][stage]["hosts"])
            except Cancelled:
                cancel_remaining(self.run, self.backend, reason="cancelled by the user")
                return 1
            if not ok:
                self.run.cancel(chain[index + 1:], reason=f"{stage} failed")
                return 1
        return 0

    def run_stage(self, stage: str, hosts: list) -> bool:
        run = self.run
        try:
            self.backend.check_stage(run, stage, hosts)
        except UserError as exc:
            run.fail(stage, str(exc))
            return False
        # Markers of an earlier attempt (pid, exit, endpoint) must not be mistaken for this one's.
        shutil.rmtree(run.state_dir(stage), ignore_errors=True)
        nodes = {rank: self.backend.start_node(run, stage, rank, host) for rank, host in enumerate(hosts)}
        node_states = {rank: StageState.RUNNING for rank in nodes}
        run.start(stage, node_states=_as_record(node_states))
        while True:
            if self.cancel_requested:
                self.stop_nodes(stage, hosts, [r for r, s in node_states.items() if s is StageState.RUNNING])
                raise Cancelled
            changed = False
            for rank, node in nodes.items():
                code = node.poll()
                if code is None or node_states[rank] is not StageState.RUNNING:
                    continue
                node_states[rank] = StageState.COMPLETED if code == 0 else StageState.FAILED
                changed = True
                if code != 0:
                    host = hosts[rank] or f"rank {rank}"
                    reason = f"node {rank} ({host}) {_describe_exit(code)}; see logs/{stage}/node-{rank:03d}.log"
                    self.stop_nodes(stage, hosts, [r for r in nodes if r != rank])
                    faults = read_faults(run, stage)
                    if faults and self.restart(stage, faults):
                        return self.run_stage(stage, hosts)   # resumes from the last complete checkpoint
                    if faults:   # what the node's watchdog found (training/watchdog.py)
                        reason = reason.replace("; see logs", f": {faults[0]['cause']}; see logs", 1)
                    run.fail(stage, reason, failed_nodes=[rank], exit_code=code, node_states=_as_record(node_states))
                    return False
            if all(s is StageState.COMPLETED for s in node_states.values()):
                run.finish(stage, node_states=_as_record(node_states))
                return True
            if changed:
                run.note(stage, node_states=_as_record(node_states))
            if stage == "deploy":
                self.record_endpoint()
            time.sleep(POLL_SECONDS)

    def restart(self, stage: str, faults: list[dict]) -> bool:
        """Record a restart of `stage` for these faults if the backend's restart budget allows one."""
        record = self.run.read()["stages"][stage]
        done = record.get("restarts", 0)
        budget = self.backend.max_restarts
        if done >= budget:
            print(f"[clusterctl] {stage}: restart budget of {budget} spent: not restarting", flush=True)
            return False
        log = record.get("restart_log", []) + [restart_entry(done + 1, time.time(), faults)]
        print(f"[clusterctl] {stage}: restart {done + 1} of {budget}: {faults[0]['cause']}", flush=True)
        self.run.note(stage, restarts=done + 1, restart_log=log)
        return True

    def record_endpoint(self) -> None:
        if self.run.read()["stages"]["deploy"].get("endpoint"):
            return
        endpoint = recorded_endpoint(self.run)
        if endpoint:
            self.run.note("deploy", **endpoint)

    def stop_nodes(self, stage: str, hosts: list, ranks: list[int]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(ranks)))) as pool:
            refused = [m for m in pool.map(lambda r: self.backend.kill_node(self.run, stage, r, hosts[r]), ranks) if m]
        record_refusals(self.run, stage, refused)


def record_refusals(run: Run, stage: str, refused: list[str]) -> None:
    """Processes left alone because they are no longer ours: in the log and in run.json, where
    `cancel` (another process) finds them to report."""
    for message in refused:
        print(f"[clusterctl] {stage}: {message}", flush=True)
    if refused:
        run.update(lambda data: data["stages"][stage].setdefault("refused", []).extend(refused))


def _as_record(node_states: dict[int, StageState]) -> dict[str, str]:
    return {str(rank): state.value for rank, state in node_states.items()}


def cancel_remaining(run: Run, backend: SupervisedBackend, *, reason: str) -> list[str]:
    """Stop every node of every unfinished stage, then mark those stages CANCELLED; returns the
    refusals (recorded processes that are no longer ours, left alone)."""
    data = run.read()
    stages = unfinished(data)
    refused: list[str] = []
    for stage in stages:
        stopped = stop_stage(run, backend, stage, data["stages"][stage]["hosts"])
        record_refusals(run, stage, stopped)
        refused += stopped
    run.cancel(stages, reason=reason)
    return refused


def stop_stage(run: Run, backend: SupervisedBackend, stage: str, hosts: list) -> list[str]:
    """kill_node on every node of a stage that recorded a pid marker."""
    if not any(run.state_dir(stage).glob("node-*.pid")):
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
        return [m for m in pool.map(lambda r: backend.kill_node(run, stage, r, hosts[r]), range(len(hosts))) if m]


def main(argv: list[str]) -> int:
    run = Run(argv[0])
    supervisor = Supervisor(run)
    signal.signal(signal.SIGTERM, supervisor.request_cancel)
    signal.signal(signal.SIGINT, supervisor.request_cancel)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # survives the terminal closing
    return supervisor.run_chain()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
