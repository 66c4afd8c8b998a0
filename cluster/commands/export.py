"""`clusterctl export gguf RUN`: a run's converted model as one GGUF file for llama.cpp / Ollama."""
from __future__ import annotations

import json
from pathlib import Path

import click

from clusterctl.commands import options
from clusterctl.errors import UserError


def converted_model(run) -> Path:
    """The complete HF folder the run's convert stage wrote (merged, for LoRA runs)."""
    from clusterctl.atomic import MARKER

    convert = run.read()["stages"].get("convert") or {}
    output = convert.get("output") if isinstance(convert, dict) else None
    if not isinstance(convert, dict) or convert.get("state") != "COMPLETED" or not output:
        state = convert.get("state", "none") if isinstance(convert, dict) else "damaged"
        raise UserError(f"run {run.id} has no completed convert stage (its state: {state})", where=str(run.json_path),
                        fix=f"run `clusterctl convert {run.id}` first (LoRA runs: it merges the adapter)")
    if not (Path(output) / MARKER).is_file():
        raise UserError(f"{output} is not a complete model folder (no {MARKER})", where=str(run.json_path),
                        fix=f"run `clusterctl convert {run.id}` again")
    return Path(output)


@click.group("export")
def command():
    """Export a run's converted model to other formats."""


@command.command("gguf")
@click.argument("run")
@click.option("--type", "gguf_type", default="f16", show_default=True,
              help="f32, f16, bf16, q8_0 (converted directly) or q4_k_m (f16, then llama-quantize).")
@click.option("--out", type=click.Path(dir_okay=False), help="GGUF file to write (default: RUN/export/RUN-TYPE.gguf).")
@options.runs_dir
@options.as_json
def gguf_command(run, gguf_type, out, runs_dir, as_json):
    """Convert RUN's converted (merged) model to GGUF with llama.cpp, plus an Ollama Modelfile beside it."""
    from clusterctl.convert.gguf import check_type, default_path, export_gguf
    from clusterctl.run import find_run

    check_type(gguf_type)
    found = find_run(runs_dir, run)
    model = converted_model(found)
    target = Path(out).resolve() if out else default_path(found.dir, gguf_type)
    if target.is_dir():
        raise UserError(f"--out {out} is a folder", fix="name the .gguf file to write")
    result = export_gguf(model, target, gguf_type, progress=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"{result['gguf']}\nOllama: ollama create NAME -f {result['modelfile']}")
