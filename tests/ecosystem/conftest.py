"""The ecosystem tests launch real SFT runs with the training tests' helpers (tests/training/sft_run.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "training"))
