"""Rendering at scale: `submit sft --dry-run` at 32, 256 and 1024 nodes on the ssh and slurm
backends, the run folder written two ways in the same process:

- before: the previous code path (up to d455329): every file written with its own temp name,
  fsync and rename, then an fsync of its folder (2 syncs per file);
- after:  clusterctl.publish.publish_run: every file unsynced in `<runs>/.<id>.partial`, one
  syncfs(2), a rename into place, one fsync of the runs folder.

`render only` is the floor (templates rendered, nothing written). Syncs are counted by wrapping os.fsync, os.sync and publish.sync_filesystem. Times are the best of
`--repeat` runs (default 3), each in a fresh runs folder on the disk given by --dir (default: a
temporary folder; point it at the file system runs_dir lives on), after a sync(2) that settles what
the previous measurement left dirty.

    python bench/render/bench_render.py [--dir PATH] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from clusterctl import publish, render
from clusterctl.atomic import atomic_write_text
from clusterctl.backends.base import backend_for
from clusterctl.config import load_cluster, load_job
from clusterctl.run import Run, master_port_for, new_run_id
from clusterctl.submit import create_run

CLUSTERS = {
    "ssh": "backend: ssh\nhosts: ['node[0001-1024]']\ngpus_per_node: 8\npython: /opt/clusterctl/bin/python\n"
           "setup: {all: ['source /opt/clusterctl/bin/activate']}\n",
    "slurm": "backend: slurm\ngpus_per_node: 8\npython: /opt/clusterctl/bin/python\n"
             "slurm: {partition: gpu, time: '7-00:00:00'}\nsetup: {all: ['source /opt/clusterctl/bin/activate']}\n",
}
JOB = "name: bench\nmodel: /models/DeepSeek-V3-bf16\ndata: /data/train.jsonl\nsft: {sequence_parallel: 4}\n"


class SyncCounter:
    """Counts every fsync/sync/syncfs made while active."""

    def __enter__(self):
        self.count = 0
        self.saved = os.fsync, os.sync, publish.sync_filesystem

        def counted(function):
            def wrapper(*args, **kwargs):
                self.count += 1
                return function(*args, **kwargs)
            return wrapper
        os.fsync, os.sync = counted(self.saved[0]), counted(self.saved[1])
        publish.sync_filesystem = counted(self.saved[2])
        return self

    def __exit__(self, *_):
        os.fsync, os.sync, publish.sync_filesystem = self.saved


def settings(folder: Path, backend: str, nodes: int):
    (folder / "cluster.yaml").write_text(CLUSTERS[backend])
    (folder / "job.yaml").write_text(JOB)
    cluster = load_cluster(str(folder / "cluster.yaml"))
    job = load_job(str(folder / "job.yaml"), cluster=cluster, sft_nodes=nodes, check_paths=False)
    return cluster, job


def before(runs: Path, cluster, job) -> None:
    """The previous create_run: render, mkdir, run.json, then every file through atomic_write_text."""
    backend = backend_for(cluster)
    run = Run(runs / new_run_id())
    files = render.render_run(run, ["sft", "convert", "deploy"], cluster=cluster, job=job, backend=backend,
                              master_port=master_port_for(run.id), overrides={})
    (run.dir / "logs").mkdir(parents=True)
    run.write({"run": run.id, "chain": ["sft", "convert", "deploy"], "stages": {}, "backend": cluster.backend})
    for relative, text in files.items():
        atomic_write_text(run.dir / relative, text, mode=0o755 if relative.endswith(".sh") else 0o644)


def after(runs: Path, cluster, job) -> None:
    create_run(stages=["sft", "convert", "deploy"], cluster=cluster, job=job, runs_dir=runs, dry_run=True)


def render_only(runs: Path, cluster, job) -> None:
    """The floor: the templates rendered, nothing written."""
    run = Run(runs / new_run_id())
    render.render_run(run, ["sft", "convert", "deploy"], cluster=cluster, job=job, backend=backend_for(cluster),
                      master_port=master_port_for(run.id), overrides={})
    runs.mkdir(parents=True)


def measure(way, root: Path, backend: str, nodes: int, repeat: int) -> tuple[float, int, int]:
    """(best seconds, syncs, files) of `way` over `repeat` fresh runs folders."""
    cluster, job = settings(root, backend, nodes)
    best, syncs = float("inf"), 0
    for attempt in range(repeat):
        runs = root / f"runs-{way.__name__}-{attempt}"
        os.sync()   # settle what the previous measurement left dirty (not counted, not timed)
        with SyncCounter() as counter:
            started = time.perf_counter()
            way(runs, cluster, job)
            best = min(best, time.perf_counter() - started)
        syncs = counter.count
        files = sum(1 for p in runs.rglob("*") if p.is_file())
        shutil.rmtree(runs)
    return best, syncs, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where the runs folders go (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    options = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-render-", dir=options.dir))
    rows = []
    try:
        for backend in ("ssh", "slurm"):
            for nodes in (32, 256, 1024):
                old = measure(before, root, backend, nodes, options.repeat)
                new = measure(after, root, backend, nodes, options.repeat)
                floor = measure(render_only, root, backend, nodes, options.repeat)
                rows.append({"backend": backend, "nodes": nodes, "files": new[2], "before_s": old[0],
                             "before_syncs": old[1], "after_s": new[0], "after_syncs": new[1],
                             "render_s": floor[0]})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"submit sft --dry-run (sft+convert+deploy rendered), best of {options.repeat}, runs folder on "
          f"{options.dir or tempfile.gettempdir()}")
    print(f"{'backend':<8}{'nodes':>6}{'files':>7}{'before s':>10}{'syncs':>7}{'after s':>9}{'syncs':>7}"
          f"{'speed-up':>10}{'render only s':>15}")
    for r in rows:
        print(f"{r['backend']:<8}{r['nodes']:>6}{r['files']:>7}{r['before_s']:>10.3f}{r['before_syncs']:>7}"
              f"{r['after_s']:>9.3f}{r['after_syncs']:>7}{r['before_s'] / r['after_s']:>9.1f}x{r['render_s']:>15.3f}")
    if options.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
