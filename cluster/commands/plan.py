"""`clusterctl plan`: will this SFT job fit in GPU and host memory, and if not, what is the smallest change."""
from __future__ import annotations

import json
import math

import click

from clusterctl.plan import GIB, Plan, Setup, load_shape, plan, suggest
from clusterctl.training.config import BUILTIN_TINY_MODEL


@click.command("plan")
@click.option("--model", default=BUILTIN_TINY_MODEL, show_default=True, help="model folder or config.json")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--sp", type=click.IntRange(min=1), default=1, show_default=True, help="sequence parallel size")
@click.option("--zero", type=click.Choice(["2", "3"]), default="3", show_default=True)
@click.option("--offload/--no-offload", default=False, show_default=True, help="optimizer states in host RAM")
@click.option("--offload-param", is_flag=True, help="ZeRO-3 parameters in host RAM too")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True)
@click.option("--gpu-memory", type=float, default=80.0, show_default=True, help="GiB per GPU",
              callback=lambda ctx, param, value: _positive(param, value))
@click.option("--host-memory", type=float, default=2048.0, show_default=True, help="GiB of RAM per node",
              callback=lambda ctx, param, value: _positive(param, value))
@click.option("--method", type=click.Choice(["full", "lora", "qlora"]), default="full", show_default=True,
              help="full-parameter SFT, or LoRA / QLoRA adapters on a frozen base")
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def command(model, nodes, gpus_per_node, sp, zero, offload, offload_param, micro_batch, seq_len,
            gradient_checkpointing, gpu_memory, host_memory, method, lora_rank, as_json) -> None:
    """Per-GPU and per-node memory of a full-parameter SFT job (formulas: clusterctl/plan.py).
    Exits 1 when it does not fit."""
    shape = load_shape(model)
    setup = Setup(nodes=nodes, gpus_per_node=gpus_per_node, sp=sp, zero=int(zero), offload_optimizer=offload,
                  offload_param=offload_param, micro_batch=micro_batch, seq_len=seq_len,
                  gradient_checkpointing=gradient_checkpointing, gpu_memory_gib=gpu_memory,
                  host_memory_gib=host_memory, method=method, lora_rank=lora_rank)
    result = plan(shape, setup)
    fix = None if result.fits else suggest(shape, setup)
    if as_json:
        report = result.to_dict()
        report["suggestion"] = {"change": fix[0], "plan": fix[1].to_dict()} if fix else None
        click.echo(json.dumps(report, indent=2))
    else:
        _print(result, fix)
    if not result.fits:
        raise SystemExit(1)


def _positive(param: click.Parameter, value: float) -> float:
    """A memory size: a finite number above 0 (NaN would make every comparison false: "fits" nowhere)."""
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{value:g} is not a number of GiB above 0", param=param)
    return value


def _print(result: Plan, fix) -> None:
    s = result.setup
    click.echo(f"model: {result.params / 1e9:.3f} B parameters (largest module {result.largest_module / 1e9:.3f} B); "
               f"{s.nodes} node(s) x {s.gpus_per_node} GPU(s), sp {s.sp}, ZeRO-{s.zero}"
               f"{', offload optimizer' if s.offload_optimizer else ''}{', offload params' if s.offload_param else ''}; "
               f"micro-batch {s.micro_batch} x {s.seq_len} tokens")
    if s.method != "full":
        click.echo(f"{s.method}: rank {s.lora_rank} on every target group, {result.trained / 1e6:.1f} M trained "
                   f"parameters ({100 * result.trained / result.params:.2f} %)")
    for title, parts, total, limit, ok in (
            ("per GPU", result.gpu, result.gpu_total, s.gpu_memory_gib, result.fits_gpu),
            ("per node (host RAM)", result.host, result.host_total, s.host_memory_gib, result.fits_host)):
        click.echo(f"{title}:")
        for name, value in parts.items():
            click.echo(f"  {name:<22} {value / GIB:10.2f} GiB")
        verdict = "fits" if ok else "DOES NOT FIT"
        click.echo(f"  {'total x ' + str(s.buffer_factor):<22} {total / GIB:10.2f} GiB of {limit:g} GiB: {verdict}")
    if fix:
        text, better = fix
        click.echo(f"suggestion: {text}: {better.gpu_total / GIB:.1f} GiB per GPU, "
                   f"{better.host_total / GIB:.1f} GiB per node")
    elif not result.fits:
        click.echo("no single change makes it fit: add nodes, lower seq-len, or use GPUs with more memory")
