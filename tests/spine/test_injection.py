"""The class test of shell injection: EVERY string field of cluster.yaml and of the job spec (found by
walking their dataclasses, so a field added later is covered without touching this file) is fed
command substitution, backticks, `;`, quotes, `#` and newlines; the run folder is rendered for every
backend (what --dry-run writes) and its scripts are executed with stand-in binaries on PATH (python,
sbatch, srun, pdsh, ray, vllm, ... that only exit). Nothing may run that was not meant to: no canary
file appears. A field may instead refuse the value, with a clean ConfigError naming that field (how
one-line fields refuse newlines, and enumerations refuse anything else)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import typing
from importlib import resources
from pathlib import Path

import pytest

import clusterctl
from clusterctl.config import ClusterConfig, load_cluster, load_job
from clusterctl.errors import ConfigError
from clusterctl.spec import JobSpec
from clusterctl.submit import create_run

PAYLOADS = {
    "subshell": "$(touch {canary})",
    "backticks": "`touch {canary}`",
    "semicolon": "x; touch {canary}; true",
    "single-quote": "x'; touch {canary}; echo '",
    "double-quote": 'x"; touch {canary}; echo "',
    "hash": "x #; touch {canary}",
    "newline": "x\ntouch {canary}\n",
}
# Fields whose value is shell code by design: nothing to inject into.
SHELL_CODE = {"cluster.setup": "the cluster's own set-up lines, run as written"}
# Fields the node script executes or opens: a hostile value stops the script there (it is not a
# command that runs), so they go alone, not to cut the other fields' run short.
# ppo.reward_model goes alone too: PPO takes one reward, so beside ppo.rewards it is refused for that.
ALONE = ("cluster.python", "job.deploy.api_key_file", "job.ppo.reward_model")
STAND_INS = ("python", "ray", "vllm", "xtuner", "torchrun", "sbatch", "srun", "pdsh", "scontrol", "nvidia-smi")
BACKENDS = {"local": {}, "ssh": {"hosts": ["h1"]}, "slurm": {}}


def string_fields(cls, prefix: str) -> list[tuple[str, str]]:
    """(dotted path, kind) of every string-holding field: str, list[str], dict[str, str]."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "INTERNAL", ()):
            continue
        path, hint = f"{prefix}.{f.name}", hints[f.name]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            found += string_fields(hint, path)
        elif hint is str:
            found.append((path, "str"))
        elif origin is list and args == (str,):
            found.append((path, "list"))
        elif origin is dict and args == (str, str):
            found.append((path, "dict"))
        elif path in SHELL_CODE or not holds_text(hint):
            continue
        else:
            raise AssertionError(f"{path}: a field of type {hint} this test does not know how to fill: teach "
                                 "string_fields about it, so that its strings are covered")
    return found


def holds_text(hint) -> bool:
    return hint is str or any(holds_text(arg) for arg in typing.get_args(hint))


FIELDS = string_fields(ClusterConfig, "cluster") + string_fields(JobSpec, "job")


def test_the_walk_finds_the_fields_and_names_it_must():
    assert "OMP_NUM_THREADS" in names_the_code_reads()
    paths = {path for path, _ in FIELDS}
    assert {"cluster.env", "cluster.interface", "cluster.slurm.partition", "cluster.slurm.extra_options",
            "cluster.ssh.user", "job.name", "job.model", "job.deploy.served_model_name", "job.deploy.extra_args",
            "job.convert.dtype"} <= paths
    assert not paths & {"job.sft.output_dir", "job.source", "cluster.source"}   # internal: never from a file


def names_the_code_reads() -> list[str]:
    """Keys of env-like mappings that clusterctl itself looks up (e.g. OMP_NUM_THREADS): such a value
    may be rendered on its own path, so it is injected under its own name too."""
    sources = [*Path(clusterctl.__file__).parent.rglob("*.py"),
               *Path(str(resources.files("clusterctl.templates"))).rglob("*.j2")]
    pattern = re.compile(r"env(?:\.get\(|\[)\s*['\"]([A-Za-z_][A-Za-z0-9_]*)['\"]")
    return sorted({name for source in sources for name in pattern.findall(source.read_text())})


def canary(label: str) -> str:
    return "PWNED_" + re.sub(r"\W", "_", label)


def cases(payload: str, tmp_path: Path) -> list[list[tuple[str, str, object]]]:
    """Groups of (label, dotted path, value) set together; every field appears in one group."""
    values, keys, named, alone = [], [], [], []
    for path, kind in FIELDS:
        text = payload.format(canary=canary(path))
        if path in ("job.model", "job.data"):            # must exist: make one under the hostile name
            text = str(existing(tmp_path, path, text))
        value = {"str": text, "list": [text], "dict": {"INJECTED": text}}[kind]
        (alone.append([(path, path, value)]) if path in ALONE else values.append((path, path, value)))
        if kind == "dict":
            keys.append((path + "{key}", path, {payload.format(canary=canary(path + "{key}")): "1"}))
            named.append((path + "{named}", path, {name: payload.format(canary=canary(f"{path}.{name}"))
                                                   for name in names_the_code_reads()}))
    return [values, keys, named, *alone]


def existing(tmp_path: Path, path: str, text: str) -> Path:
    target = tmp_path / "inputs" / (path.split(".")[-1] + "-" + text)
    target.parent.mkdir(exist_ok=True)
    if path == "job.model":
        target.mkdir(exist_ok=True)
        (target / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_hidden_layers": 3}))
    else:
        target.write_text('{"messages": []}\n')
    return target


def render(group, backend: str, tmp_path: Path, engine: str, runs_dir: Path):
    """Load the files with the group's values as overrides and render the run folder (--dry-run);
    drop each field that refuses its value (a ConfigError naming that field, at load or while
    rendering, before anything is written) until the rest goes through."""
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(json.dumps({"backend": backend, "python": str(tmp_path / "bin" / "python"),
                                        **BACKENDS[backend]}))
    job_file = tmp_path / "job.yaml"
    model = existing(tmp_path, "job.model", "plain")
    data = existing(tmp_path, "job.data", "plain.jsonl")
    job_file.write_text(json.dumps({"model": str(model), "data": str(data), "engine": engine}))
    group, refused = list(group), []
    while group:
        overrides = {"cluster": [], "job": []}
        for label, path, value in group:
            file, dotted = path.split(".", 1)
            overrides[file].append((dotted, value, f"INJECT[{label}]"))
        try:
            cluster = load_cluster(str(cluster_file), overrides["cluster"])
            job = load_job(str(job_file), cluster=cluster, overrides=overrides["job"])
            return create_run(stages=["sft", "convert", "deploy"], cluster=cluster, job=job, runs_dir=runs_dir,
                              dry_run=True), refused
        except ConfigError as error:
            blamed = [case for case in group if f"INJECT[{case[0]}]" in str(error)] or \
                [case for case in group if f": {case[1].split('.', 1)[1]}" in str(error)]
            assert blamed, f"a refusal that names no injected field: {error}"
            assert not runs_dir.exists(), "a refused value left a run folder behind"
            group.remove(blamed[0])
            refused.append((blamed[0][0], str(error)))
    return None, refused


def stand_ins(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in STAND_INS:
        (folder / name).write_text("#!/bin/sh\nexit 0\n")
        (folder / name).chmod(0o755)
    return folder


def execute(script: Path, tmp_path: Path, folder: Path) -> None:
    env = {"PATH": f"{folder}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "SLURM_NODEID": "0",
           "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "h1", "LANG": "C.UTF-8"}
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path / "work", env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{script} did not finish in 30 s with stand-in binaries") from None


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("backend, engine", [("local", "clusterctl"), ("ssh", "clusterctl"),
                                             ("slurm", "clusterctl"), ("local", "xtuner")])
def test_no_string_field_runs_a_command(tmp_path, backend, engine, payload):
    folder = stand_ins(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "home").mkdir()
    rendered, all_refused = 0, set()
    for index, group in enumerate(cases(PAYLOADS[payload], tmp_path)):
        run, refused = render(group, backend, tmp_path, engine, tmp_path / "runs" / str(index))
        all_refused |= {label for label, _ in refused}
        if payload == "newline":   # whatever takes a newline holds it as data; a refusal says why
            unexplained = [(label, message) for label, message in refused if not any(
                reason in message for reason in ("newline", "unknown", "not a valid", "does not exist", "bad host",
                                                 "absolute path"))]
            assert not unexplained, unexplained
        if run is None:
            continue
        scripts = sorted(run.dir.glob("*/node-*.sh")) + sorted(run.dir.glob("*/job.sbatch")) + \
            sorted(run.dir.glob("*/pdsh.sh"))
        for script in scripts:
            execute(script, tmp_path, folder)
        rendered += len(scripts)
    assert rendered, "every field refused the value: nothing was rendered"
    if payload == "newline":   # the one-line fields (#SBATCH lines, headers, options) say so
        assert {"job.name", "cluster.slurm.partition", "job.deploy.served_model_name"} <= all_refused
    ran = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("PWNED_*"))
    assert not ran, f"injected commands ran (a file per field): {ran}"
