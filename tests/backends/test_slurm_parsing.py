"""Slurm's output as the backend reads it, for several releases (20.11, 22.05, 23.11, 24.05): squeue,
scontrol and sacct formats change between releases, and the real cluster of test_slurm.py is one of
them. Each file under slurm_outputs/ holds one release's outputs and what they must parse to."""
import json
from pathlib import Path

import pytest

from clusterctl.backends.slurm import jobs_working_in, parse_sacct, parse_scontrol, parse_squeue, still_queued

RELEASES = sorted((Path(__file__).parent / "slurm_outputs").glob("slurm-*.json"))
PARSERS = {
    "squeue": lambda case: parse_squeue(case["out"]),
    "scontrol": lambda case: parse_scontrol(case["out"]),
    "sacct": lambda case: parse_sacct(case["out"], case["job"]),
    "squeue_states": lambda case: still_queued(case["out"]),
    "squeue_workdirs": lambda case: jobs_working_in(case["out"], set(case["folders"])),
}
CASES = [pytest.param(kind, case, id=f"{path.stem}-{kind}-{case['what']}")
         for path in RELEASES for kind, cases in json.loads(path.read_text())["cases"].items() for case in cases]


def test_every_release_covers_every_parser():
    assert len(RELEASES) >= 4
    for path in RELEASES:
        assert set(json.loads(path.read_text())["cases"]) == set(PARSERS), path.name


@pytest.mark.parametrize("kind, case", CASES)
def test_recorded_output_parses(kind, case):
    assert PARSERS[kind](case) == case["expected"]
