"""Experiment trackers beside metrics.jsonl (rank 0 only): MLflow, Weights & Biases, SwanLab.

Each gets the numbers metrics.jsonl holds (loss, lr, grad_norm, tokens_per_s, eval_loss, per step),
the resolved job spec as parameters and the run id as its run name, so a team finds a clusterctl run
in the tracker it already uses. A tracker is a guest: when it cannot be reached or fails, it prints
one warning and is dropped; training and metrics.jsonl go on.

- MLflow: MLFLOW_TRACKING_URI (cluster.yaml `env:`). An http(s) server is spoken to over MLflow's
  REST API with the standard library (no package on the nodes; MLFLOW_TRACKING_TOKEN or
  MLFLOW_TRACKING_USERNAME/PASSWORD read from the node's environment); a local store
  (`sqlite:////shared/mlflow.db`; MLflow 3 refuses plain folders unless MLFLOW_ALLOW_FILE_STORE=true) or
  any other URI goes through the `mlflow` package (`pip install clusterctl[mlflow]`). MLFLOW_EXPERIMENT_NAME
  picks the experiment (default "clusterctl"). A requeued run continues the same MLflow run.
- W&B / SwanLab: offline unless WANDB_MODE / SWANLAB_MODE say otherwise (nothing leaves the node by
  default); their runs are written under the stage folder (sft/wandb, sft/swanlog) and uploaded later
  with `wandb sync` / `swanlab sync`. WANDB_PROJECT / SWANLAB_PROJECT (default "clusterctl").
"""
from __future__ import annotations

import base64
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from clusterctl.atomic import atomic_write_text

TRACKERS = ("tensorboard", "mlflow", "wandb", "swanlab")
METRIC_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")
MLFLOW_PARAM_LIMIT = 6000          # characters MLflow keeps of a parameter value


def check_report_to(report_to: list[str], at) -> None:
    """Job-spec check of sft.report_to (no tracker package is imported here)."""
    from clusterctl.errors import ConfigError

    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker(s) {', '.join(map(repr, unknown))}", where=at("report_to"),
                          fix=f"use any of: {', '.join(TRACKERS)} (e.g. report_to: [tensorboard, mlflow])")


def flatten(values, prefix: str = "") -> dict[str, str]:
    """{"sft": {"lr": 1e-5}} -> {"sft.lr": "1e-05"}: a job spec as tracker parameters."""
    if isinstance(values, dict):
        out: dict[str, str] = {}
        for key, value in values.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    text = json.dumps(values) if isinstance(values, list) else str(values)
    return {prefix.rstrip("."): text}


def run_params(run_dir: str | None, fallback: dict) -> dict[str, str]:
    """The run's resolved job spec (RUN_DIR/job.yaml), or `fallback` outside a run folder."""
    if run_dir:
        try:
            return flatten(yaml.safe_load((Path(run_dir) / "job.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError):
            pass
    return flatten(fallback)


class Tracker:
    """One tracker: `start` once, `log` per record, `close` at the end; any exception drops it."""
    name = ""

    def start(self, run_name: str, params: dict[str, str]) -> None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MlflowRest:
    """The few MLflow REST calls a run needs, over urllib (MLflow's REST API 2.0)."""

    def __init__(self, uri: str, timeout: float = 10.0):
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            self.headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(self, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read() or b"{}")

    def experiment_id(self, name: str) -> str:
        try:
            return self.call("experiments/get-by-name", query={"experiment_name": name})["experiment"]["experiment_id"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        return self.call("experiments/create", {"name": name})["experiment_id"]

    def create_run(self, experiment_id: str, name: str) -> str:
        return self.call("runs/create", {"experiment_id": experiment_id, "run_name": name,
                                         "start_time": int(time.time() * 1000),
                                         "tags": [{"key": "mlflow.runName", "value": name}]})["run"]["info"]["run_id"]

    def log_batch(self, run_id: str, metrics: list[dict], params: list[dict]) -> None:
        for i in range(0, max(len(params), 1), 100):                 # MLflow takes 100 params per call
            self.call("runs/log-batch", {"run_id": run_id, "metrics": metrics if i == 0 else [],
                                         "params": params[i:i + 100]})

    def finish(self, run_id: str) -> None:
        self.call("runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)})


class MlflowPackage:
    """The same calls through the `mlflow` package, for file stores and other non-HTTP URIs."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def create_run(self, experiment_id: str, name: str) -> str:
        return self.client.create_run(experiment_id, run_name=name).info.run_id

    def log_batch(self, run_id: str, metrics: list[dict], params: list[dict]) -> None:
        from mlflow.entities import Metric, Param
        for i in range(0, max(len(params), 1), 100):
            self.client.log_batch(run_id, metrics=[Metric(**m) for m in metrics] if i == 0 else [],
                                  params=[Param(**p) for p in params[i:i + 100]])

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id)


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, folder: Path):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            raise RuntimeError("MLFLOW_TRACKING_URI is not set (add it to cluster.yaml `env:`)")
        self.api = MlflowRest(uri) if uri.startswith(("http://", "https://")) else MlflowPackage(uri)
        self.uri = uri
        self.record = folder / "mlflow-run.json"      # the MLflow run a requeued run continues
        self.run_id = ""

    def start(self, run_name: str, params: dict[str, str]) -> None:
        try:
            previous = json.loads(self.record.read_text())
        except (OSError, ValueError):
            previous = {}
        if previous.get("uri") == self.uri and previous.get("run_id"):
            self.run_id = previous["run_id"]
            return
        experiment = self.api.experiment_id(os.environ.get("MLFLOW_EXPERIMENT_NAME", "clusterctl"))
        self.run_id = self.api.create_run(experiment, run_name)
        atomic_write_text(self.record, json.dumps({"uri": self.uri, "run_id": self.run_id}) + "\n")
        self.api.log_batch(self.run_id, [], [{"key": k, "value": v[:MLFLOW_PARAM_LIMIT]}
                                             for k, v in sorted(params.items())])

    def log(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.api.log_batch(self.run_id, [{"key": k, "value": v, "timestamp": now, "step": step}
                                         for k, v in values.items()], [])

    def close(self) -> None:
        self.api.finish(self.run_id)


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, folder: Path):
        import wandb
        self.wandb, self.folder = wandb, folder
        self.run: Any = None

    def start(self, run_name: str, params: dict[str, str]) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "clusterctl"), name=run_name,
                                   id=run_name, resume="allow", config=params, dir=str(self.folder),
                                   mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanlabTracker(Tracker):
    name = "swanlab"

    def __init__(self, folder: Path):
        import swanlab
        self.swanlab, self.folder = swanlab, folder
        self.run: Any = None

    def start(self, run_name: str, params: dict[str, str]) -> None:
        self.run = self.swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "clusterctl"),
                                     experiment_name=run_name, config=params, logdir=str(self.folder / "swanlog"),
                                     mode=os.environ.get("SWANLAB_MODE", "offline"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


KINDS = {"mlflow": MlflowTracker, "wandb": WandbTracker, "swanlab": SwanlabTracker}


class Trackers:
    """The trackers `report_to` names (tensorboard is written by Metrics itself), each dropped with one
    warning on its first failure."""

    def __init__(self, report_to: list[str], *, folder: Path, run_name: str, params: dict[str, str]):
        self.active: list[Tracker] = []
        for name in report_to:
            if name in KINDS:
                self._guard(name, lambda kind=KINDS[name]: self._start(kind(folder), run_name, params))

    def _start(self, tracker: Tracker, run_name: str, params: dict[str, str]) -> None:
        tracker.start(run_name, params)
        self.active.append(tracker)

    def _guard(self, name: str, action) -> bool:
        try:
            action()
            return True
        except Exception as exc:   # noqa: BLE001 - a tracker must never stop training
            print(f"[sft] warning: {name} tracking stopped, training goes on (metrics stay in metrics.jsonl): "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return False

    def log(self, record: dict) -> None:
        values = {k: float(record[k]) for k in METRIC_KEYS
                  if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])}
        for tracker in list(self.active):
            if not self._guard(tracker.name, lambda t=tracker: t.log(record["step"], values)):
                self.active.remove(tracker)

    def close(self) -> None:
        for tracker in self.active:
            self._guard(tracker.name, tracker.close)
        self.active = []


def open_trackers(cfg) -> Trackers:
    """The trackers of a TrainConfig, named after the run (RUN_DIR's name) and written beside metrics."""
    import dataclasses

    run_dir = os.environ.get("RUN_DIR")
    folder = Path(cfg.metrics_file).parent if cfg.metrics_file else Path(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return Trackers(cfg.report_to, folder=folder, run_name=Path(run_dir).name if run_dir else folder.name,
                    params=run_params(run_dir, dataclasses.asdict(cfg)))
