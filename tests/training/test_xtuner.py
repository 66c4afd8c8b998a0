"""engine: xtuner — the rendered xtuner config (golden files) and the data it reads."""
import ast
import dataclasses
import difflib
import json
import os
from pathlib import Path

import pytest

from clusterctl.render import environment
from clusterctl.training import xtuner_data
from clusterctl.training.config import TrainConfig

GOLDEN = Path(__file__).parent / "golden"
REFRESH = "CLUSTERCTL_REFRESH_GOLDEN=1 python -m pytest tests/training/test_xtuner.py"
SPECS = {
    "xtuner_config_recipe.py": dict(model="/models/DeepSeek-R1 bf16", sequence_parallel=4, grad_accum=16,
                                    micro_batch=2, max_length=32768, lr=2e-7),
    "xtuner_config_max_steps.py": dict(model="/models/it's \"quoted\"\nnewline", max_steps=50, bf16=False,
                                       packing=True, min_lr_ratio=0.1, save_steps=10, grad_accum=4),
}


def render(values: dict) -> str:
    spec = dataclasses.asdict(TrainConfig(output_dir="/runs/r1/sft/checkpoints", metrics_file="/runs/r1/sft/metrics.jsonl",
                                          tensorboard_dir="/runs/r1/sft/tensorboard", **values))
    return environment().get_template("xtuner/config.py.j2").render(
        spec=spec, stage={"dir": "/runs/r1/sft"}, outputs={"checkpoints": "/runs/r1/sft/checkpoints"})


def settings(text: str) -> dict:
    """The simple `name = literal` assignments of the config (what xtuner's runner reads)."""
    values = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "dict":   # dict(KEY=literal, ...)
                value = ast.Dict([ast.Constant(k.arg) for k in value.keywords], [k.value for k in value.keywords])
            try:
                values[node.targets[0].id] = ast.literal_eval(value)
            except ValueError:
                pass
    return values


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden_xtuner_config(name):
    text = render(SPECS[name])
    golden = GOLDEN / name
    if os.environ.get("CLUSTERCTL_REFRESH_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    diff = "\n".join(difflib.unified_diff(golden.read_text().splitlines(), text.splitlines(), f"golden/{name}",
                                          "rendered", lineterm=""))
    assert not diff, f"{diff}\nif the change is intended, refresh with: {REFRESH}"


def test_config_carries_the_job_values():
    recipe = settings(render(SPECS["xtuner_config_recipe.py"]))
    assert recipe["pretrained_model_name_or_path"] == "/models/DeepSeek-R1 bf16"
    assert (recipe["sequence_parallel_size"], recipe["batch_size"], recipe["accumulative_counts"]) == (4, 2, 16)
    assert (recipe["max_length"], recipe["lr"], recipe["max_epochs"], recipe["resume"]) == (32768, 2e-7, 1.0, True)
    assert recipe["data_files"] == ["/runs/r1/sft/xtuner_data.jsonl"]
    assert recipe["prompt_template"]["INSTRUCTION"] == "<｜User｜>{input}<｜Assistant｜>"
    steps = settings(render(SPECS["xtuner_config_max_steps.py"]))
    assert steps["pretrained_model_name_or_path"] == "/models/it's \"quoted\"\nnewline"   # hostile path survives
    assert (steps["max_iters"], steps["save_steps"], steps["pack_to_max_length"]) == (200, 40, True)
    assert "max_epochs" not in steps and steps["eta_min"] == pytest.approx(2e-7 * 0.1)


def test_data_for_xtuner_folds_reasoning_and_keeps_loss_flags(tmp_path):
    out = tmp_path / "x.jsonl"
    assert xtuner_data.main(["builtin:tiny-reasoning", str(out)]) == 0
    rows = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    assistants = [m for row in rows for m in row if m["role"] == "assistant"]
    assert all(set(m) == {"role", "content", "loss"} for m in assistants)
    assert any(m["content"].startswith("<think>\n") and "\n</think>\n\n" in m["content"] for m in assistants)
    assert any(m["loss"] is False for m in assistants) and any(m["loss"] is True for m in assistants)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "a"}]\n')
    assert xtuner_data.main([str(bad), str(tmp_path / "never.jsonl")]) == 2
    assert not (tmp_path / "never.jsonl").exists()
