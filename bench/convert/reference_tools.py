"""The reference tools the benchmark measures against, as command lines run in their own processes.

    python reference_tools.py save-pretrained CKPT OUT    zero_to_fp32 (in memory) + load + save_pretrained
    python reference_tools.py fp8-official SRC OUT        DeepSeek's fp8_cast_bf16.py structure, CPU kernel
"""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "convert"))


def save_pretrained(ckpt: str, out: str) -> None:
    """What people do to get a servable folder: gather everything in RAM, load it, save_pretrained."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    state = get_fp32_state_dict_from_zero_checkpoint(ckpt, lazy_mode=False)
    hf = os.path.join(ckpt, "hf")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.bfloat16)
    model.load_state_dict(state, strict=True)
    del state
    model.save_pretrained(out)
    for name in os.listdir(hf):
        if name != "config.json":
            shutil.copy(os.path.join(hf, name), out)


def fp8_official(src: str, out: str) -> None:
    """inference/fp8_cast_bf16.py: per shard, load it whole, dequantise each fp8 weight block by block,
    save the shard whole, drop the scales from the index."""
    from fp8_reference import official_dequant
    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(os.path.join(src, shard))
        new = {}
        for name, tensor in state.items():
            if name.endswith("_scale_inv"):
                continue
            new[name] = official_dequant(tensor, state[name + "_scale_inv"]) if tensor.element_size() == 1 else tensor
        save_file(new, os.path.join(out, shard))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)


if __name__ == "__main__":
    {"save-pretrained": save_pretrained, "fp8-official": fp8_official}[sys.argv[1]](*sys.argv[2:])
