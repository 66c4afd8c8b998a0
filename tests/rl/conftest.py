"""The tiny model, built once per session for the RL tests."""
from pathlib import Path

import pytest

from clusterctl.training.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
