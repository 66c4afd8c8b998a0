"""Every command that reads a run folder, fed a damaged copy of each file it reads (truncated, empty,
binary, wrong types, a list where an object belongs, nested too deeply): one `clusterctl: error:`
line naming the file, never a traceback. The readers are walked from the CLI's own verb table, so a
new verb must say here whether it reads a run folder (and which files) or the test fails."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.runs import as_submitted, write_cluster

from clusterctl import cli
from clusterctl.run import Run

RUN = "{run}"
# verb -> (its arguments, the run folder's files it reads)
READERS = {
    "status": (["status", RUN], ["run.json", "cluster.yaml"]),
    "logs": (["logs", RUN], ["run.json"]),
    "cancel": (["cancel", RUN], ["run.json", "cluster.yaml"]),
    "retry": (["retry", RUN], ["run.json", "cluster.yaml"]),
    "health": (["health", RUN, "--timeout", "1"], ["run.json", "state/deploy/endpoint.json"]),
    "convert": (["convert", RUN], ["run.json"]),
    "deploy": (["deploy", RUN], ["run.json"]),
    "plot": (["plot", RUN, "--out", "{tmp}/loss.png"], ["sft/metrics.jsonl"]),
    "export": (["export", "gguf", RUN], ["run.json"]),
}
LISTERS = {"runs": ["runs"]}   # many runs at once: a damaged one is listed as such, the others still are
NOT_READERS = {"submit", "doctor", "plan", "data", "fp8-to-bf16"}

CORRUPTIONS = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "binary": lambda good: b"\x00\xff\xfe\x80 not text \xc3\x28",
    "list": lambda good: b"[]\n",
    "wrong types": lambda good: json.dumps({"chain": "sft", "stages": [1], "backend": 7, "url": 5,
                                            "step": "x", "loss": [], "hosts": 1}).encode() + b"\n",
    "deep": lambda good: b"[" * 100000 + b"]" * 100000,
    "every leaf retyped": lambda good: retyped(good),
}


def retyped(good: bytes) -> bytes:
    """The same structure with every scalar of another type (text -> number, number -> text, ...);
    a file that is not JSON (cluster.yaml) becomes a mapping of retyped values."""
    def walk(value):
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return {str: 7, bool: "yes", int: "7", float: "7.5"}.get(type(value), {})
    try:
        lines = [json.loads(line) for line in good.splitlines() if line.strip()]
    except ValueError:
        return json.dumps({"backend": 7, "hosts": "x", "slurm": [1], "env": 3}).encode()
    return b"\n".join(json.dumps(walk(line)).encode() for line in lines) + b"\n"
# What the damage leaves usable: health needs only an endpoint, and falls back to
# state/deploy/endpoint.json when run.json's is unusable. (A run's cluster.yaml is written with every
# field, so even a cut that leaves valid YAML, or an empty file, is refused.)
STILL_VALID = {("health", "run.json", "every leaf retyped")}


def invoke(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """The real entry point in this process (fast): (exit status, stderr). An exception that gets
    past it is what a user would see as a traceback."""
    monkeypatch.setattr(sys, "argv", ["clusterctl", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A local run whose SFT and convert failed and whose deploy looks busy: every reader reads it,
    none submits anything. Rendered once; each test damages its own copy."""
    root = tmp_path_factory.mktemp("pristine")
    yaml = write_cluster(root / "cluster.yaml", {"backend": "local"})
    out = subprocess.run([sys.executable, "-m", "clusterctl.cli", "submit", "sft", "--dry-run", "--cluster", yaml,
                          "--json", "--runs-dir", str(root / "runs")], capture_output=True, text=True, check=True)
    run = Run(json.loads(out.stdout)["dir"])
    as_submitted(run.dir)
    run.apply({"sft": {"state": "FAILED", "reason": "x"}, "convert": {"state": "FAILED", "reason": "x"}})
    run.start("deploy", node_states={"0": "RUNNING"})
    run.state_dir("deploy").mkdir(parents=True)
    (run.state_dir("deploy") / "endpoint.json").write_text('{"url": "http://127.0.0.1:9", "model": "m"}\n')
    (run.stage_dir("sft") / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n')
    return run.dir


@pytest.fixture
def run_folder(pristine, tmp_path) -> Run:
    copy = tmp_path / "runs" / pristine.name
    shutil.copytree(pristine, copy)
    return Run(copy)


def test_every_verb_is_classified():
    assert set(cli.VERBS) == set(READERS) | set(LISTERS) | NOT_READERS


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("verb,name", [(verb, name) for verb, (_, files) in READERS.items() for name in files])
def test_a_damaged_file_is_named_not_a_traceback(run_folder, tmp_path, monkeypatch, capsys, verb, name, corruption):
    path = run_folder.dir / name
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    args = [a.format(run=run_folder.dir, tmp=tmp_path) for a in READERS[verb][0]]
    code, err = invoke(args, monkeypatch, capsys)
    if (verb, name, corruption) in STILL_VALID:
        assert "Traceback" not in err, err   # an uncaught exception would have left invoke() already
        return
    assert code == 2, err
    assert err.startswith("clusterctl: error: ") and str(path) in err, err


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_damaged_run_is_listed_as_broken(run_folder, monkeypatch, capsys, corruption):
    path = run_folder.json_path
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    monkeypatch.setenv("CLUSTERCTL_RUNS", str(run_folder.dir.parent))
    code, err = invoke(LISTERS["runs"], monkeypatch, capsys)
    assert code == 0 and "Traceback" not in err
