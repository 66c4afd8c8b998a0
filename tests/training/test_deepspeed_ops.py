"""The trainer compiles no DeepSpeed op it does not call, and names the one it must compile."""
import os
import subprocess
import sys

from fixtures.ports import free_port

START_BACKEND = """
import deepspeed
from deepspeed import comm
from clusterctl.training import deepspeed_ops
deepspeed_ops.skip_unused_ops()
deepspeed.init_distributed(dist_backend="gloo")
print("shm op:", comm.comm.cdb.shm_comm_op)
"""


def test_starting_deepspeed_for_training_compiles_nothing(tmp_path):
    """Unskipped, DeepSpeed's CPU backend compiles deepspeed_shm_comm here (a minute of gcc)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-c", START_BACKEND], env=env, capture_output=True, text=True, check=False,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "shm op: None" in done.stdout
    assert not (tmp_path / "ext" / "deepspeed_shm_comm").exists()


def test_an_op_about_to_be_compiled_is_announced_once_cached_not(tmp_path, monkeypatch, capsys):
    from clusterctl.training import deepspeed_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    deepspeed_ops.announce_build("cpu_adam")
    line = capsys.readouterr().out
    assert "rank 1: compiling DeepSpeed's cpu_adam op (first use on this machine only" in line
    assert str(tmp_path / "cpu_adam" / "lock") in line
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    deepspeed_ops.announce_build("cpu_adam")
    assert capsys.readouterr().out == ""
