"""`clusterctl runs`: every run folder, newest first, from run.json alone; filters; a broken run.json
is listed as broken instead of stopping the listing."""
import json
import shutil
import time
from pathlib import Path

from clusterctl.runs_list import age


def dry_run(clusterctl, *args) -> Path:
    return Path(json.loads(clusterctl("submit", "sft", "--dry-run", "--json", *args).stdout)["dir"])


def set_run(run_dir: Path, **changes) -> None:
    data = json.loads((run_dir / "run.json").read_text())
    for stage, state in changes.pop("states", {}).items():
        data["stages"][stage]["state"] = state
    data.update(changes)
    (run_dir / "run.json").write_text(json.dumps(data))


def test_lists_hundreds_of_runs_newest_first_with_states_and_endpoint(clusterctl, tmp_path):
    template = dry_run(clusterctl)
    runs = tmp_path / "runs"
    now = time.time()
    for i in range(300):          # copies of a real run.json, one created per minute
        folder = runs / f"20261201-{i:06d}-abcd"
        folder.mkdir()
        shutil.copy(template / "run.json", folder / "run.json")
        set_run(folder, run=folder.name, created=now - 60 * (400 - i))
    shutil.rmtree(template)
    serving = runs / "20261201-000299-abcd"
    set_run(serving, states={"sft": "COMPLETED", "convert": "COMPLETED", "deploy": "RUNNING"})
    data = json.loads((serving / "run.json").read_text())
    data["stages"]["deploy"]["endpoint"] = "http://10.0.0.5:8000/v1"
    (serving / "run.json").write_text(json.dumps(data))
    set_run(runs / "20261201-000298-abcd", states={"sft": "RUNNING"})
    set_run(runs / "20261201-000010-abcd", states={"sft": "FAILED"})

    listed = json.loads(clusterctl("runs", "--json").stdout)["runs"]
    assert [r["run"] for r in listed] == [f"20261201-{i:06d}-abcd" for i in reversed(range(300))]
    top = listed[0]
    assert top["stages"] == {"sft": "COMPLETED", "convert": "COMPLETED", "deploy": "RUNNING"}
    assert top["endpoint"] == "http://10.0.0.5:8000/v1" and top["model"] == "builtin:tiny-deepseek-v3"
    assert listed[1]["stages"]["sft"] == "RUNNING" and listed[1]["endpoint"] == ""

    running = json.loads(clusterctl("runs", "--json", "--state", "running").stdout)["runs"]
    assert [r["run"] for r in running] == ["20261201-000299-abcd", "20261201-000298-abcd"]
    failed = clusterctl("runs", "--state", "FAILED").stdout.splitlines()
    assert failed[0].split() == ["RUN", "AGE", "BACKEND", "STAGES", "MODEL", "ENDPOINT"]
    assert failed[1].split()[:2] == ["20261201-000010-abcd", f"{(400 - 10) // 60}h"]
    assert "sft:FAILED convert:PENDING deploy:PENDING" in failed[1]

    text = clusterctl("runs", "--limit", "1").stdout.splitlines()
    assert len(text) == 2 and "http://10.0.0.5:8000/v1" in text[1] and "deploy:RUNNING" in text[1]


def test_a_broken_run_json_is_listed_as_broken(clusterctl, tmp_path):
    good = dry_run(clusterctl, "--stages", "sft,convert")
    truncated = tmp_path / "runs" / "20990101-000000-dead"
    truncated.mkdir()
    (truncated / "run.json").write_text('{"run": "20990101-000000-dead", "stag')
    odd = tmp_path / "runs" / "20990101-000001-beef"
    odd.mkdir()
    (odd / "run.json").write_text('{"run": "x"}')

    result = clusterctl("runs")
    assert "Traceback" not in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {good.name, truncated.name, odd.name}
    assert "BROKEN" in rows[truncated.name] and "run.json is not JSON (line 1" in rows[truncated.name]
    assert "BROKEN" in rows[odd.name] and "lacks a field" in rows[odd.name]
    assert "sft:PENDING convert:PENDING" in rows[good.name]
    broken = json.loads(clusterctl("runs", "--json", "--state", "broken").stdout)["runs"]
    assert sorted(r["run"] for r in broken) == sorted([truncated.name, odd.name])
    assert all(r["error"] for r in broken)


def test_empty_runs_folder_and_age_units(clusterctl):
    result = clusterctl("runs")
    assert result.stdout == "" and "no runs under" in result.stderr
    assert json.loads(clusterctl("runs", "--json").stdout)["runs"] == []
    assert [age(s) for s in (5, 61, 7200, 3 * 86400 + 5)] == ["5s", "1m", "2h", "3d"]
