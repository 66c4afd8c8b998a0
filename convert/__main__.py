"""`python -m clusterctl.convert`: the convert stage's node-side entry point (see CONTRACTS.md)."""
from __future__ import annotations

import argparse
import os
import sys

from clusterctl.errors import UserError

from .units import at_least, parse_size, seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clusterctl.convert", description="Convert a DeepSpeed ZeRO "
                                "checkpoint to a servable Hugging Face folder, streaming in bounded memory.")
    p.add_argument("--checkpoint", required=True, help="The SFT output_dir (newest complete tag is used) or one "
                                                       "tag folder.")
    p.add_argument("--out", required=True, help="The Hugging Face folder to write.")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="(default: bf16)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="Check names, shapes and bytes, then logits against the checkpoint (default: on).")
    p.add_argument("--workers", type=at_least(1), default=1, help="Processes writing shards in parallel.")
    p.add_argument("--force", action="store_true", help="Replace an existing complete output folder.")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="Largest safetensors file (default 5GB).")
    p.add_argument("--nodes", type=at_least(1), default=1,
                   help="Nodes sharing the work (the output folder must be on a file system they all see).")
    p.add_argument("--node-rank", type=at_least(0), default=0,
                   help="This node's rank; node 0 prepares, waits for the others and finishes the folder.")
    p.add_argument("--wait-timeout", type=seconds, default=3600.0,
                   help="Seconds a node waits for the others at each rendezvous (default 3600).")
    p.add_argument("--base", help="LoRA checkpoints: the base model folder to merge into (default: the one the "
                                  "adapter was trained on)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")
    from .core import convert

    try:
        if a.node_rank >= a.nodes:
            raise UserError(f"--node-rank {a.node_rank} is not below --nodes {a.nodes}", where="--node-rank")
        from .merge import lora_checkpoint, merge_checkpoint
        if lora_checkpoint(a.checkpoint):     # base + adapter -> merged folder (and the adapter beside it)
            return merge_checkpoint(a.checkpoint, a.out, base=a.base, verify=a.verify, force=a.force,
                                    max_shard_bytes=a.max_shard_size, node_rank=a.node_rank)
        convert(a.checkpoint, a.out, dtype=a.dtype, verify=a.verify, workers=a.workers, force=a.force,
                max_shard_bytes=a.max_shard_size, nodes=a.nodes, node_rank=a.node_rank,
                wait_timeout=a.wait_timeout)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_and_exit_fast() -> None:
    """Run the command; on success leave without the interpreter's teardown of torch (about half a second,
    a fifth of a small conversion): by then every file is written, fsynced and renamed."""
    code = main()
    if code:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_and_exit_fast()
