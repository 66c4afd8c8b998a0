"""A real 2-rank SFT run reporting to a real MLflow tracking server (started here, on loopback) and to
W&B offline, with a held-out eval split, `select: best` and the deploy gate's verdict on its metrics;
and a run whose tracker cannot be reached, which trains anyway."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from fixtures.ports import free_port
from sft_run import read_metrics, sft_command, sft_env, write_config

from clusterctl.training import checkpoint as ckpt
from clusterctl.training import evaluation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# install.sh puts the MLflow server in a venv of its own (mlflow pins cachetools < 8 and pyarrow < 26,
# below what the training/serving stack uses); the trainer speaks MLflow's REST API without it.
MLFLOW_PYTHON = Path(sys.prefix) / "mlflow" / "bin" / "python"
RUN_ID = "20261202-120000-beef"
KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    assert MLFLOW_PYTHON.exists(), f"{MLFLOW_PYTHON} is missing: run install.sh (it sets up the MLflow server)"
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        ["timeout", "900", str(MLFLOW_PYTHON), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--default-artifact-root", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    "MLflow server did not start:\n" + (folder / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_in_run_folder(tmp_path: Path, env: dict, **values) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank SFT run inside a run folder (RUN_DIR with its job.yaml, as the node scripts export it)."""
    run_dir = tmp_path / RUN_ID
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(yaml.safe_dump({"name": "sft", "model": "builtin:tiny-deepseek-v3",
                                                      "sft": {"nodes": 1, **values}}))
    config = write_config(run_dir / "sft", **values)
    result = subprocess.run(sft_command(config, 2), capture_output=True, text=True, timeout=600,
                            env={**sft_env(), "RUN_DIR": str(run_dir), **env}, start_new_session=True)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return run_dir / "sft", result


def mlflow_read(uri: str, experiment: str) -> list[dict]:
    """Every run of the experiment as MLflow's own client reads it back."""
    script = (
        "import json, sys\nfrom mlflow.tracking import MlflowClient\n"
        "c = MlflowClient(sys.argv[1])\n"
        "e = c.get_experiment_by_name(sys.argv[2])\n"
        "out = []\n"
        "for r in c.search_runs([e.experiment_id]):\n"
        "    out.append({'name': r.info.run_name, 'status': r.info.status, 'params': r.data.params,\n"
        "                'metrics': {k: [[m.step, m.value] for m in c.get_metric_history(r.info.run_id, k)]\n"
        f"                            for k in {KEYS!r}}}}})\n"
        "print(json.dumps(out))\n")
    result = subprocess.run([str(MLFLOW_PYTHON), "-c", script, uri, experiment], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (":W&B" header, 32 KiB blocks, 7-byte record
    headers: crc, length, type 1 full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:                     # a block's tail too short for a header
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def wandb_history(sft_dir: Path) -> list[dict]:
    """The history rows of the offline W&B run, decoded with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    (path,) = sft_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_tracked_run_with_eval_split_and_best_checkpoint(tmp_path, mlflow_uri):
    sft_dir, result = run_in_run_folder(
        tmp_path, {"MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_EXPERIMENT_NAME": "issue14"},
        max_steps=6, eval_ratio=0.1, eval_steps=2, save_steps=2, save_total_limit=1, select="best",
        report_to=["tensorboard", "mlflow", "wandb"], tensorboard_dir=str(tmp_path / RUN_ID / "sft" / "tensorboard"))
    assert "tracking stopped" not in result.stderr, result.stderr[-2000:]
    records = read_metrics(sft_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(7))
    evaluated = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evaluated) == [0, 2, 4, 6]                     # baseline, every 2 steps, the end
    assert evaluated[6] < evaluated[0]
    assert "eval_loss" in result.stdout

    # MLflow: same numbers per step as metrics.jsonl, the job spec as params, the run id as run name.
    (tracked,) = mlflow_read(mlflow_uri, "issue14")
    assert tracked["name"] == RUN_ID and tracked["status"] == "FINISHED"
    assert tracked["params"]["sft.select"] == "best" and tracked["params"]["sft.eval_ratio"] == "0.1"
    assert tracked["params"]["model"] == "builtin:tiny-deepseek-v3"
    for key in KEYS:
        expected = [[r["step"], r[key]] for r in records if key in r]
        assert tracked["metrics"][key] == expected, key

    # W&B offline: the run folder holds the same history, readable by W&B's own reader.
    history = wandb_history(sft_dir)
    by_step = {row["_step"]: row for row in history}
    for record in records:
        for key in KEYS:
            if key in record:
                assert by_step[record["step"]][key] == pytest.approx(record[key], rel=1e-6), (record["step"], key)

    # TensorBoard has the eval curve too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(sft_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4, 6]

    # select: best: `latest` (what convert reads) names the lowest-eval-loss checkpoint, kept by pruning.
    checkpoints = sft_dir / "checkpoints"
    best_step = min((loss, step) for step, loss in evaluated.items() if step)[1]
    assert (checkpoints / "latest").read_text() == ckpt.tag_for(best_step)
    assert ckpt.tag_for(6) in ckpt.complete_tags(checkpoints)
    marker = json.loads((checkpoints / ckpt.tag_for(best_step) / ckpt.MARKER).read_text())
    assert marker["eval_loss"] == evaluated[best_step]

    # The deploy gate judges that checkpoint, and says why when it refuses.
    metrics = sft_dir / "metrics.jsonl"
    ok, figures = evaluation.gate(metrics, max_eval_loss=None, better_than_start=True, checkpoint_dir=checkpoints)
    assert ok and f"at step {best_step}" in figures
    ok, figures = evaluation.gate(metrics, max_eval_loss=evaluated[best_step] / 2, better_than_start=False,
                                  checkpoint_dir=checkpoints)
    assert not ok and f"eval_loss {evaluated[best_step]:.4f} at step {best_step} is above the gate's" in figures


def test_unreachable_tracker_warns_once_and_training_goes_on(tmp_path):
    sft_dir, result = run_in_run_folder(
        tmp_path, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        max_steps=2, save_steps=2, eval_ratio=0.1, report_to=["mlflow"],
        tensorboard_dir=str(tmp_path / RUN_ID / "sft" / "tensorboard"))
    assert result.stderr.count("mlflow tracking stopped, training goes on") == 1, result.stderr[-3000:]
    assert "Connection refused" in result.stderr
    records = read_metrics(sft_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert not (sft_dir / "tensorboard").exists()          # tensorboard not asked for
    assert ckpt.complete_tags(sft_dir / "checkpoints") == ["step-2"]


def test_mlflow_local_store_goes_through_the_mlflow_package(tmp_path):
    """A non-HTTP tracking URI (here MLflow 3's local SQLite store) is written with the mlflow package:
    run in the venv that has it, read back with its client."""
    script = (
        "import json, sys\nfrom pathlib import Path\nfrom clusterctl.training.tracking import Trackers\n"
        "from mlflow.tracking import MlflowClient\n"
        "trackers = Trackers(['mlflow'], folder=Path(sys.argv[1]), run_name='20261202-000000-f00d',\n"
        "                    params={'sft.lr': '0.001'})\n"
        "for step in (1, 2):\n"
        "    trackers.log({'step': step, 'loss': 1.0 / step, 'lr': 0.1, 'grad_norm': float('nan')})\n"
        "trackers.close()\n"
        "client = MlflowClient(sys.argv[2])\n"
        "run = client.search_runs([client.get_experiment_by_name('clusterctl').experiment_id])[0]\n"
        "print(json.dumps([run.info.run_name, run.info.status, run.data.params,\n"
        "                  [[m.step, m.value] for m in client.get_metric_history(run.info.run_id, 'loss')],\n"
        "                  len(client.get_metric_history(run.info.run_id, 'grad_norm'))]))\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = subprocess.run([str(MLFLOW_PYTHON), "-c", script, str(tmp_path / "sft"), uri], capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert result.returncode == 0 and "tracking stopped" not in result.stderr, result.stderr[-3000:]
    name, status, params, loss, grad_norms = json.loads(result.stdout.splitlines()[-1])
    assert (name, status, params) == ("20261202-000000-f00d", "FINISHED", {"sft.lr": "0.001"})
    assert loss == [[1, 1.0], [2, 0.5]] and grad_norms == 0        # a NaN grad norm is not sent
    assert json.loads((tmp_path / "sft" / "mlflow-run.json").read_text())["uri"] == uri
