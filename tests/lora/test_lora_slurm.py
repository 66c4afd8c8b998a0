"""LoRA SFT of the built-in tiny DeepSeek-V3 on 2 nodes of the Slurm test cluster (real slurmctld/slurmd, gloo
across the nodes), `targets: [all]`, then the merge: the same modules trained as on the local backend (dense MLP,
shared and routed experts, attention), the checkpoint holds only adapters, and the merged model differs from the
base in exactly the adapted tensors."""
import json
import re
from pathlib import Path

import pytest
from fixtures.runs import logs_of, submit, write_cluster, write_yaml
from fixtures.slurm_cluster import SlurmCluster
from lora_checks import (
    assert_all_groups_targeted,
    assert_checkpoint_holds_only_adapters,
    assert_merge_changed_only_adapted,
)

from clusterctl.procs import processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

JOB = {"name": "lora-slurm", "sft": {"nodes": 2, "max_length": 128, "micro_batch": 1, "grad_accum": 1, "max_steps": 2,
                                     "save_steps": 2, "lr": 1.0e-3, "offload_optimizer": False, "offload_param": False,
                                     "method": "lora", "lora": {"rank": 4, "alpha": 8, "targets": ["all"]}}}


def test_lora_all_groups_on_two_slurm_nodes_trains_and_merges_only_the_adapters(clusterctl, wait_for, tmp_path,
                                                                                 monkeypatch):
    with SlurmCluster(nodes=2, gpus_per_node=0) as slurm:
        monkeypatch.setenv("SLURM_CONF", slurm.conf)
        cluster = write_cluster(tmp_path / "cluster.yaml", {"backend": "slurm",
                                                            "slurm": {"partition": slurm.partition, "time": "30:00"}})
        job = write_yaml(tmp_path / "job.yaml", JOB)
        run_id, run_dir = submit(clusterctl, "sft", "--stages", "sft,convert", "--cluster", cluster, "--job", job)
        try:
            stages = wait_for(run_id, lambda s: all(r["state"] in ("COMPLETED", "FAILED", "CANCELLED")
                                                    for r in s.values()), timeout=600, what="sft and convert")["stages"]
        finally:
            clusterctl("cancel", run_id, check=False)
    assert [stages[s]["state"] for s in ("sft", "convert")] == ["COMPLETED", "COMPLETED"], logs_of(run_dir)
    logs = [(run_dir / "logs" / "sft" / f"node-00{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert len({re.search(r"sft node \d/2 on (\S+):", log).group(1) for log in logs}) == 2   # two Slurm nodes
    assert "[sft]   model.layers.2.mlp.shared_experts.up_proj" in logs[0]          # the trained list, printed

    checkpoints = run_dir / "sft" / "checkpoints"
    described = assert_all_groups_targeted(checkpoints, rank=4)
    merged = Path(stages["convert"]["output"])
    base = Path(json.loads((merged / "clusterctl-complete.json").read_text())["source"])
    assert_checkpoint_holds_only_adapters(checkpoints / "step-2", described, base)
    assert_merge_changed_only_adapted(merged, described)
    assert processes_with_env(f"RUN_DIR={run_dir}") == []
