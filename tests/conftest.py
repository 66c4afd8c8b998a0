"""Shared test set-up: nothing phones home, and the CLI runs in-process or as a real subprocess."""
import os
import subprocess
import sys

import pytest

for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(name, value)


@pytest.fixture
def clusterctl(tmp_path):
    """Run the real `clusterctl` command line (a subprocess, as a user would) with runs under tmp_path."""
    def run(*args, check=True, timeout=900, env=None):
        result = subprocess.run([sys.executable, "-m", "clusterctl.cli", *map(str, args)],
                                capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                                env={**os.environ, "CLUSTERCTL_RUNS": str(tmp_path / "runs"), **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"clusterctl {' '.join(map(str, args))} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result
    return run
