"""`clusterctl fp8-to-bf16 SRC OUT`: DeepSeek-V3/R1's released FP8 weights -> the BF16 folder training needs."""
from __future__ import annotations

import click


@click.command("fp8-to-bf16")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing complete output folder.")
def command(src: str, out: str, force: bool) -> None:
    """Dequantise SRC (e4m3 weights with 128x128 block scales) into OUT, shard by shard, on CPU or GPU.

    OUT gets the same shard names in BF16, config.json without quantization_config, and the tokenizer and
    code files; it is complete when OUT/clusterctl-complete.json exists. An interrupted run resumes."""
    from clusterctl.convert.fp8 import cast_folder

    cast_folder(src, out, force=force)
