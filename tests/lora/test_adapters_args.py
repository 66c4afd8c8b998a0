"""deploy/adapters.py: adapters on a MoE base are refused on CPU; on GPU the 3-D expert flags are exact."""
import json
from pathlib import Path

import pytest

from clusterctl.deploy.adapters import Adapter, check, lora_args
from clusterctl.errors import ConfigError

MODELS = Path(__file__).parents[1] / "data" / "models"


def test_moe_adapters_refused_on_cpu_and_flagged_on_gpu(tmp_path):
    v3 = json.loads((MODELS / "deepseek-v3" / "config.json").read_text())
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "adapter_config.json").write_text(json.dumps({"r": 8, "target_parameters": ["mlp.experts.down_proj"]}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({"r": 16, "target_parameters": None}))
    adapters = [Adapter("math", str(fused)), Adapter("chat", str(plain))]
    with pytest.raises(ConfigError, match="CPU build cannot serve LoRA adapters on a MoE model"):
        check(adapters, model_config=v3, gpus_per_node=0, where="job.yaml:9: deploy.adapters")
    check(adapters, model_config=v3, gpus_per_node=8, where="deploy.adapters")
    assert lora_args(adapters, model_config=v3) == [
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--enable-mixed-moe-lora-format",
        "--lora-modules", json.dumps({"name": "math", "path": str(fused), "is_3d_lora_weight": True}),
        json.dumps({"name": "chat", "path": str(plain)})]
    with pytest.raises(ConfigError, match="adapter names repeat"):
        check([adapters[0], adapters[0]], model_config=v3, gpus_per_node=8, where="deploy.adapters")
