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
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes sharing the work (the output folder must be on a file system they all see).")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="This node's rank; node 0 prepares, waits for the others and finishes the folder.")
@click.option("--wait-timeout", type=float, default=3600, show_default=True,
              help="Seconds a node waits for the others at each rendezvous.")
def main(checkpoint, out, dtype, verify, workers, force, max_shard_size, nodes, node_rank, wait_timeout):
    """Convert a DeepSpeed ZeRO checkpoint to a servable Hugging Face folder, streaming in bounded memory."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")
    from .core import convert

    try:
        if node_rank >= nodes:
            raise UserError(f"--node-rank {node_rank} is not below --nodes {nodes}", where="--node-rank")
        convert(checkpoint, out, dtype=dtype, verify=verify, workers=workers, force=force,
                max_shard_bytes=parse_size(max_shard_size), nodes=nodes, node_rank=node_rank,
                wait_timeout=wait_timeout)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def run_and_exit_fast() -> None:
    """Run the command; on success leave without the interpreter's teardown of torch (about half a second,
    a fifth of a small conversion): by then every file is written, fsynced and renamed."""
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_and_exit_fast()
