"""A model's config.json that is not an object, or holds a list, a string, a bool or 0 where a count belongs,
is refused with the file and key named (plan, submit's memory check, the deploy layout check), never a
TypeError or ZeroDivisionError; and the message does not blame the convert stage for the user's folder."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from clusterctl.commands.plan import command as plan_command
from clusterctl.deploy.vllm_args import check_parallel, read_model_config
from clusterctl.errors import UserError
from clusterctl.plan import load_shape

V3 = Path(__file__).parents[1] / "data" / "models" / "deepseek-v3" / "config.json"
COUNTS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "num_key_value_heads", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
          "kv_lora_rank", "v_head_dim"]


def model_folder(tmp_path: Path, content: bytes) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_bytes(content)
    return tmp_path / "model"


ZERO_MEANS_ABSENT = ("n_routed_experts", "kv_lora_rank")      # 0 there: a dense model, no MLA


@pytest.mark.parametrize("key, bad", [(key, bad) for key in COUNTS for bad in ["8", 0, [8], True, 2.5]
                                      if not (bad == 0 and key in ZERO_MEANS_ABSENT)])
def test_every_count_of_a_real_config_is_checked(tmp_path, key, bad):
    config = json.loads(V3.read_text())
    folder = model_folder(tmp_path, json.dumps({**config, key: bad}).encode())
    with pytest.raises(UserError, match=rf"config.json: {key} must be a whole number of at least 1, found "):
        load_shape(str(folder))


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "expected a JSON object of settings, found a list"),
    (b'"text"', "expected a JSON object of settings, found a str"),
    (b"{trunc", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
    (b"{}", "num_attention_heads is missing"),
])
def test_a_config_that_is_not_a_settings_object_is_named(tmp_path, content, message):
    folder = model_folder(tmp_path, content)
    result = CliRunner().invoke(plan_command, ["--model", str(folder)])
    assert isinstance(result.exception, UserError), result.output
    assert str(result.exception).startswith(f"{folder / 'config.json'}: {message}")
    assert "convert stage" not in str(result.exception)


def test_the_deploy_layout_check_names_the_bad_count(tmp_path):
    with pytest.raises(UserError, match='num_attention_heads must be a whole number of at least 1, found "8"'):
        check_parallel(2, 1, gpus_per_node=2, nodes=1, model_config={"num_attention_heads": "8"})
    with pytest.raises(UserError, match="num_hidden_layers must be a whole number of at least 1, found 0"):
        check_parallel(1, 1, gpus_per_node=2, nodes=1, model_config={"text_config": {"num_hidden_layers": 0}})
    with pytest.raises(UserError, match="text_config must be an object"):
        check_parallel(1, 1, gpus_per_node=2, nodes=1, model_config={"text_config": [1]})
    with pytest.raises(UserError, match="found a list") as refused:
        read_model_config(model_folder(tmp_path, b"[]"))
    assert "correct the model folder's config.json" in str(refused.value)
