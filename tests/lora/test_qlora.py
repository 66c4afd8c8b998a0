"""QLoRA on a dense tiny Llama: 4-bit NF4 base (bitsandbytes' CPU path), LoRA on every linear layer under
ZeRO-2, the adapter merged back into the bf16 base and matching base + adapter."""
import json

import pytest
from sft_run import read_metrics, run_sft, write_config

from clusterctl.errors import ConfigError
from clusterctl.training.config import TrainConfig

pytestmark = pytest.mark.slow


def test_qlora_trains_a_4bit_base_and_merges_into_the_bf16_one(tmp_path, tiny_llama):
    from clusterctl.convert.merge import lora_checkpoint, merge

    config = write_config(tmp_path / "sft", model=str(tiny_llama), grad_accum=1, max_steps=3, save_steps=3,
                          zero_stage=2, method="qlora", lora={"rank": 4, "alpha": 8, "targets": ["all"]})
    out = run_sft(config, nproc=1).stdout
    assert "[sft] qlora: base in 4 bit (NF4, double quantisation, bf16 compute)" in out
    metrics = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] == m["loss"] for m in metrics)
    described = json.loads((tmp_path / "sft" / "checkpoints" / "lora.json").read_text())
    assert described["method"] == "qlora" and len(described["modules"]) == 2 * 7 and described["parameters"] == []

    _, hf, adapter = lora_checkpoint(str(tmp_path / "sft" / "checkpoints"))
    marker = merge(str(tiny_llama), adapter, str(tmp_path / "merged"), hf_dir=hf)
    assert marker["merged"] == 14 and marker["verify"]["logits"] == "match"


def test_qlora_under_zero3_is_refused_by_field():
    with pytest.raises(ConfigError, match="QLoRA's 4-bit base cannot be partitioned by ZeRO-3"):
        TrainConfig.from_dict({"method": "qlora", "zero_stage": 3, "offload_param": False})
