"""FP8 -> BF16 against the official per-block dequantisation, bit for bit, on a small release-layout folder."""
import json
import os

import pytest
import torch
from fp8_reference import make_fp8_folder, official_dequant
from safetensors.torch import load_file

from clusterctl.atomic import MARKER
from clusterctl.convert import fp8
from clusterctl.errors import UserError

SHAPES = {
    "model.embed_tokens.weight": (300, 64),
    "model.layers.0.self_attn.q_a_proj.weight": (300, 200),            # edge blocks in both dims
    "model.layers.0.mlp.experts.0.down_proj.weight": (128, 256),
    "model.layers.0.mlp.experts.0.gate_proj.weight": (2500, 130),       # crosses a row band
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.mlp.gate.e_score_correction_bias": (4,),
}


@pytest.fixture
def fp8_folder(tmp_path):
    src = str(tmp_path / "fp8")
    return src, make_fp8_folder(src, SHAPES)


def loaded(folder):
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def test_bit_for_bit_with_the_official_dequantisation(fp8_folder, tmp_path):
    src, original = fp8_folder
    out = str(tmp_path / "bf16")
    marker = fp8.cast_folder(src, out)
    got = loaded(out)
    assert set(got) == set(SHAPES)
    for name in SHAPES:
        want = original[name]
        if want.dtype == torch.float8_e4m3fn:
            want = official_dequant(want, original[name + "_scale_inv"])
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert set(index) == set(SHAPES) and sorted(set(index.values())) == sorted(marker["files"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert config["topk_method"] == "noaux_tc"
    assert {"tokenizer.json", "modeling_deepseek.py", "configuration_deepseek.py", MARKER} <= set(os.listdir(out))


def test_command_line_refuses_to_overwrite_without_force(fp8_folder, tmp_path, clusterctl):
    src, _ = fp8_folder
    out = tmp_path / "bf16"
    first = clusterctl("fp8-to-bf16", src, out)
    assert "complete:" in first.stdout and (out / MARKER).exists()
    again = clusterctl("fp8-to-bf16", src, out, check=False)
    assert again.returncode == 2 and "--force" in again.stderr
    clusterctl("fp8-to-bf16", src, out, "--force")


def test_refuses_a_weight_without_its_scale(fp8_folder, tmp_path):
    src, original = fp8_folder
    index_path = os.path.join(src, "model.safetensors.index.json")
    index = json.load(open(index_path))
    shard = index["weight_map"]["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    tensors = load_file(os.path.join(src, shard))
    del tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(src, shard))
    with pytest.raises(UserError, match=r"fp8 tensor model.layers.0.self_attn.q_a_proj.weight has no .*_scale_inv"):
        fp8.cast_folder(src, str(tmp_path / "bf16"))


def test_refuses_a_folder_that_is_not_fp8(fp8_folder, tmp_path):
    src, _ = fp8_folder
    cfg = json.load(open(os.path.join(src, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(UserError, match="no fp8 e4m3 quantization_config"):
        fp8.cast_folder(src, str(tmp_path / "bf16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_gpu_gives_the_same_bits(fp8_folder):
    _, original = fp8_folder
    w, s = original["model.layers.0.self_attn.q_a_proj.weight"], original["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    assert torch.equal(fp8.dequantize(w, s, device="cuda"), official_dequant(w, s))


@pytest.mark.parametrize("damage, message", [
    (lambda path: open(path, "r+b").truncate(4), "not a safetensors file"),
    (lambda path: open(path, "wb").write(b"\xff" * 8 + b"{}"), r"not a safetensors file \(its header claims"),
    (lambda path: open(path, "wb").write((12).to_bytes(8, "little") + b'{"a": [1,2]}'), "not a safetensors header"),
    (lambda path: open(path, "wb").write((7).to_bytes(8, "little") + b'{"a": }'), "not a safetensors file"),
])
def test_a_damaged_shard_is_named_before_anything_is_written(fp8_folder, tmp_path, damage, message):
    src, _ = fp8_folder
    shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[0]
    damage(os.path.join(src, shard))
    with pytest.raises(UserError, match=rf"{shard}: {message}"):
        fp8.cast_folder(src, str(tmp_path / "bf16"))
    assert not os.path.exists(tmp_path / "bf16")


@pytest.mark.parametrize("file, content, message", [
    ("config.json", "[1]", "config.json: expected a JSON object"),
    ("config.json", "{trunc", "config.json: not valid JSON"),
    ("model.safetensors.index.json", '{"weight_map": [1]}', "index.json: weight_map is not an object"),
    ("model.safetensors.index.json", "{}", r"index.json: not a safetensors index \(KeyError"),
])
def test_a_damaged_config_or_index_is_named(fp8_folder, tmp_path, file, content, message):
    src, _ = fp8_folder
    with open(os.path.join(src, file), "w") as f:
        f.write(content)
    with pytest.raises(UserError, match=message):
        fp8.cast_folder(src, str(tmp_path / "bf16"))


def test_a_bad_block_size_is_named(fp8_folder, tmp_path):
    src, _ = fp8_folder
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"]["weight_block_size"] = [128, "128"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(UserError, match="weight_block_size must be two whole numbers above 0"):
        fp8.cast_folder(src, str(tmp_path / "bf16"))
