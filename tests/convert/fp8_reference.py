"""The official DeepSeek-V3 dequantisation (inference/kernel.py `weight_dequant` + fp8_cast_bf16.py), written
block by block as its Triton kernel does it: each 128x128 block of the e4m3 weight is widened to fp32,
multiplied by its one scale, and stored into a bf16 tensor.  Used by tests and the benchmark as the
reference for bit-for-bit comparison, and to make small FP8 checkpoints with the release's layout."""
import json
import os

import torch
from safetensors.torch import save_file

BLOCK = 128


def official_dequant(x: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    m, n = x.shape
    y = torch.empty((m, n), dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * block:(i + 1) * block, j * block:(j + 1) * block].to(torch.float32) * s[i, j]
            y[i * block:(i + 1) * block, j * block:(j + 1) * block] = blk.to(torch.bfloat16)
    return y


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantisation: scale = amax / 448 per block; returns (e4m3 weight, scale_inv)."""
    m, n = w.shape
    s = torch.empty((-(-m // block), -(-n // block)), dtype=torch.float32)
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def make_fp8_folder(path: str, shapes: dict[str, tuple], seed: int = 0, shards: int = 2) -> dict:
    """A released-FP8-style folder: weights in e4m3 + `_scale_inv`, other tensors bf16/fp32, sharded,
    with index, config.json (quantization_config), tokenizer and code files. Returns the fp8 tensors."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(shape, generator=g)
        elif name.endswith("norm.weight") or "embed" in name:
            tensors[name] = torch.randn(shape, generator=g).to(torch.bfloat16)
        else:
            tensors[name], tensors[name + "_scale_inv"] = quantize(torch.randn(shape, generator=g) * 0.02)
    bases = sorted(shapes)                 # a weight and its scale share a shard, as in the release
    weight_map = {}
    for k in range(shards):
        part = [n for b in bases[k::shards] for n in (b, b + "_scale_inv") if n in tensors]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "deepseek_v3", "torch_dtype": "bfloat16", "topk_method": "noaux_tc",
                   "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                           "weight_block_size": [BLOCK, BLOCK]}}, f)
    for name, text in (("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"),
                       ("modeling_deepseek.py", "# code\n"), ("configuration_deepseek.py", "# code\n")):
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return tensors
