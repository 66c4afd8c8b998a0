"""The question `submit` asks the endpoint it deployed, and the answer the data set taught.

For the built-in data sets it is one of the set's own conversations, asked with greedy decoding, so the
reply shows whether training worked: the embedded default (cluster/examples/tiny-job.yaml) trains the
tiny model on the 4-conversation set until it answers as taught. For any other data set a neutral prompt, and nothing to
compare with. Reads the run's job.yaml and the shipped data file only (no torch on login nodes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from clusterctl.health import DEFAULT_PROMPT
from clusterctl.training.config import BUILTIN_DATA_FILES

TAUGHT_PROMPT = "Who trained you?"      # a user turn of both shipped sets (training/data/tiny_*.jsonl)


@dataclass(frozen=True)
class SampleQuestion:
    prompt: str
    expected: str = ""                 # the answer the data set teaches; "" when there is none to compare
    where: str = ""                    # where the question comes from, for the reader


def shipped_data(name: str = "tiny_reasoning.jsonl") -> Path:
    return Path(str(resources.files("clusterctl.training") / "data" / name))


def taught(path: Path, prompt: str) -> SampleQuestion | None:
    """The conversation of `path` whose only user turn is `prompt`, as a question and its answer."""
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        conv = json.loads(line)
        messages = conv["messages"] if isinstance(conv, dict) else conv
        users = [m["content"] for m in messages if m["role"] == "user"]
        if users == [prompt]:
            return SampleQuestion(prompt, messages[-1]["content"], f"line {number} of {path.name}")
    return None


def sample_question(run_dir: Path) -> SampleQuestion:
    """What to ask the run's endpoint: the taught question when the run trained on the built-in data."""
    try:
        data = (yaml.safe_load((run_dir / "job.yaml").read_text()) or {}).get("data")
    except (OSError, yaml.YAMLError, AttributeError):
        data = None
    found = taught(shipped_data(BUILTIN_DATA_FILES[data]), TAUGHT_PROMPT) if data in BUILTIN_DATA_FILES else None
    return found or SampleQuestion(DEFAULT_PROMPT)


def verdict(question: SampleQuestion, answer: str) -> list[str]:
    """Lines printed under the reply: the question asked and the taught answer beside it."""
    if not question.expected:
        return []
    same = answer.strip() == question.expected
    return [f"      asked:  {question.prompt!r}  ({question.where}, greedy decoding)",
            f"      taught: {question.expected!r}  "
            + ("-> the reply is the trained answer" if same else "-> the reply differs from the trained answer")]
