"""The convert stage's node scripts, rendered by the real renderer and run for real on this machine."""
import json
import subprocess
import sys

import pytest
import yaml

from clusterctl.backends.base import backend_for
from clusterctl.config import load_cluster, load_job
from clusterctl.render import render_run, write_files
from clusterctl.run import Run


def render(tmp_path, *, engine="clusterctl", nodes=1, swap_dir=None, checkpoint=None):
    cfg = {"python": sys.executable}
    if swap_dir:
        cfg["swap_dir"] = str(swap_dir)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"name": "t", "engine": engine, "convert": {"nodes": nodes}}))
    cluster = load_cluster(str(tmp_path / "cluster.yaml"))
    job = load_job(str(tmp_path / "job.yaml"), sft_nodes=None, cluster=cluster, check_paths=False)
    run = Run(tmp_path / "runs" / "20260101-000000-conv")
    files = render_run(run, ["convert"], cluster=cluster, job=job, backend=backend_for(cluster), master_port=15000,
                       overrides={"checkpoint": checkpoint} if checkpoint else {})
    return run, files


@pytest.mark.parametrize("engine", ["clusterctl", "xtuner"])
@pytest.mark.parametrize("swap", [False, True])
def test_scripts_are_valid_bash(tmp_path, engine, swap):
    _, files = render(tmp_path, engine=engine, nodes=2, swap_dir=tmp_path / "swap" if swap else None)
    for name in ("convert/node-000.sh", "convert/node-001.sh"):
        subprocess.run(["bash", "-n"], input=files[name], text=True, check=True)
        script = files[name]
        assert ("clusterctl.convert.swap up" in script) == swap
        if engine == "xtuner":
            assert "xtuner\" convert pth_to_hf" in script and 'if [ "$NODE_RANK" != 0 ]' in script
        else:
            assert '--nodes "$NNODES" --node-rank "$NODE_RANK"' in script and "--verify" in script


def test_two_node_scripts_convert_together(zero3_ckpt, tmp_path):
    run, files = render(tmp_path, nodes=2, checkpoint=zero3_ckpt)
    write_files(run, files)
    procs = [subprocess.Popen(["bash", str(run.node_script("convert", r))], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    model = run.stage_dir("convert") / "model"
    marker = json.loads((model / "clusterctl-complete.json").read_text())
    assert marker["verify"]["logits"] == "match"
    assert [(run.state_dir("convert") / f"node-00{r}.exit").read_text().strip() for r in (0, 1)] == ["0", "0"]
