"""`python -m clusterctl.convert`: the convert stage's node-side entry point (see CONTRACTS.md)."""
from __future__ import annotations

import os
import sys

import click

from clusterctl.errors import UserError

from .units import parse_size


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False),
              help="The SFT output_dir (newest complete tag is used) or one tag folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The Hugging Face folder to write.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check names, shapes and bytes, then logits against the checkpoint.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes writing shards in parallel.")
@click.option("--force", is_flag=True, help="Replace an existing complete output folder.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file.")
def main(checkpoint, out, dtype, verify, workers, force, max_shard_size):
    """Convert a DeepSpeed ZeRO checkpoint to a servable Hugging Face folder, streaming in bounded memory."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")
    from .core import convert

    try:
        convert(checkpoint, out, dtype=dtype, verify=verify, workers=workers, force=force,
                max_shard_bytes=parse_size(max_shard_size))
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
