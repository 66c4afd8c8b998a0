"""A run folder appears complete at once, in a number of syncs that does not grow with the node
count (staged in `.<id>.partial`, one syncfs, a rename, one fsync of the runs folder)."""
import os

import pytest

from clusterctl import publish
from clusterctl.config import load_cluster, load_job
from clusterctl.errors import UserError
from clusterctl.run import Run, find_run
from clusterctl.submit import create_run


def dry_run(tmp_path, nodes: int) -> Run:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "cluster.yaml").write_text("backend: ssh\nhosts: ['node[001-128]']\npython: /opt/venv/bin/python\n")
    (tmp_path / "job.yaml").write_text("model: /models/m\ndata: /data/d.jsonl\n")
    cluster = load_cluster(str(tmp_path / "cluster.yaml"))
    job = load_job(str(tmp_path / "job.yaml"), cluster=cluster, sft_nodes=nodes, check_paths=False)
    return create_run(stages=["sft", "convert", "deploy"], cluster=cluster, job=job, runs_dir=tmp_path / "runs",
                      dry_run=True)


@pytest.fixture
def syncs(monkeypatch) -> list[str]:
    """Every fsync/sync/syncfs made, by name."""
    made: list[str] = []
    for owner, name in ((os, "fsync"), (os, "sync"), (publish, "sync_filesystem")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name: made.append(_name) or _real(*a))
    return made


def test_sync_count_does_not_grow_with_the_node_count(tmp_path, syncs):
    counts = {}
    for nodes in (2, 128):
        syncs.clear()
        run = dry_run(tmp_path / str(nodes), nodes)
        counts[nodes] = list(syncs)
        assert len(list(run.stage_dir("sft").glob("node-*.sh"))) == nodes
    assert counts[2] == counts[128] == ["sync_filesystem", "fsync"]


def test_the_folder_is_complete_when_it_appears_and_nothing_is_left_behind(tmp_path):
    run = dry_run(tmp_path, 4)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run.id]
    assert run.read()["stages"]["sft"]["nodes"] == 4
    assert os.access(run.node_script("sft", 3), os.X_OK) and (run.dir / "cluster.yaml").exists()
    assert find_run(tmp_path / "runs", None).id == run.id


def test_a_failed_write_leaves_no_run_folder(tmp_path, monkeypatch):
    def broken(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(publish, "sync_filesystem", broken)
    with pytest.raises(OSError):
        dry_run(tmp_path, 2)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_partial_folder_left_by_a_crash_is_not_a_run(tmp_path):
    run = dry_run(tmp_path, 2)
    crashed = tmp_path / "runs" / ".29991231-235959-ffff.partial"
    crashed.mkdir()
    (crashed / "run.json").write_text(run.json_path.read_text())
    assert find_run(tmp_path / "runs", None).id == run.id


def test_an_unwritable_runs_folder_is_a_message(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    with pytest.raises(UserError, match="cannot create the run folder"):
        dry_run(tmp_path, 2)
