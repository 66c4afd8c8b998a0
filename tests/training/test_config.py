"""TrainConfig checks the SFT trainer relies on."""
import pytest

from clusterctl.errors import ConfigError
from clusterctl.training.config import TrainConfig


def test_packing_with_sequence_parallel_is_refused_by_name():
    with pytest.raises(ConfigError, match="train.json: packing: packing with sequence_parallel > 1"):
        TrainConfig.from_dict({"packing": True, "sequence_parallel": 2})
    assert TrainConfig.from_dict({"packing": True}).packing


def test_ds_config_matches_the_settings():
    ds = TrainConfig.from_dict({"zero_stage": 3, "micro_batch": 3, "grad_accum": 5, "offload_param": True}).ds_config()
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["zero_optimization"]["stage"] == 3 and "offload_param" in ds["zero_optimization"]
    assert "optimizer" not in ds          # the trainer passes its own (no fused_adam JIT build)
