"""Real DeepSpeed checkpoints for the convert tests: a tiny DeepSeek-V3 trained 2 steps on 2 CPU ranks."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MAKE = os.path.join(HERE, "make_checkpoint.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_checked(cmd, timeout=600, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, **kw.pop("env", {})},
                            **kw)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result


def make_checkpoint(base: str, out: str, stage: int, dtype: str, tag: str = "global_step2", *extra: str) -> str:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run_checked([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                 str(_free_port()), MAKE, "--base", base, "--out", out, "--stage", str(stage), "--dtype", dtype,
                 "--tag", tag, *extra])
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("base") / "model")
    run_checked([sys.executable, MAKE, "--build-base", base])
    return base


@pytest.fixture(scope="session")
def zero3_ckpt(base_model, tmp_path_factory):
    """SFT output_dir: ZeRO-3, bf16 training, 2 ranks."""
    return make_checkpoint(base_model, str(tmp_path_factory.mktemp("z3") / "checkpoints"), 3, "bf16")


@pytest.fixture(scope="session")
def zero2_ckpt(base_model, tmp_path_factory):
    """SFT output_dir: ZeRO-2, fp32 training, 2 ranks."""
    return make_checkpoint(base_model, str(tmp_path_factory.mktemp("z2") / "checkpoints"), 2, "fp32")


@pytest.fixture(scope="session")
def zero3_frozen_ckpt(base_model, tmp_path_factory):
    """SFT output_dir: ZeRO-3, bf16, embeddings frozen (saved as frozen fragments, not optimizer state)."""
    return make_checkpoint(base_model, str(tmp_path_factory.mktemp("z3f") / "checkpoints"), 3, "bf16",
                           "global_step2", "--freeze-embeddings")


@pytest.fixture
def ckpt_copy(zero3_ckpt, tmp_path):
    """A private copy of the ZeRO-3 output_dir that a test may damage."""
    dst = tmp_path / "checkpoints"
    shutil.copytree(zero3_ckpt, dst)
    return str(dst)
