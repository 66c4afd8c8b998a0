"""The clusterctl command line: thin Click commands over the library, one module per verb
(cluster/commands/), imported only when that verb runs so `--help` stays instant."""
from __future__ import annotations

import importlib
import sys

import click

from clusterctl import __version__
from clusterctl.errors import UserError

VERBS = {
    "submit": "submit", "convert": "stage", "deploy": "stage", "retry": "retry", "status": "status", "runs": "runs",
    "logs": "logs", "cancel": "cancel", "health": "health", "doctor": "doctor", "plan": "plan",
    "plot": "plot", "data": "data", "fp8-to-bf16": "fp8", "export": "export",
}
SUMMARIES = {
    "submit": "Render a run and submit its stages (sft -> convert -> deploy).",
    "convert": "Run the convert stage alone: checkpoint -> Hugging Face safetensors.",
    "deploy": "Run the deploy stage alone: Ray + vLLM serving a model folder.",
    "retry": "Submit a run's unfinished stages again; SFT resumes from its last checkpoint.",
    "status": "Show the state of every stage of a run.",
    "runs": "List the runs, newest first: stage states, model, endpoint, age.",
    "logs": "Print (or follow) the per-node logs of a run.",
    "cancel": "Cancel every unfinished stage of a run, dependents included.",
    "health": "Check a served endpoint: /health, /v1/models, a chat completion.",
    "doctor": "Preflight every node of a cluster.",
    "plan": "Plan SFT memory per GPU and per node; say whether it fits.",
    "plot": "Plot loss and learning rate of a run's SFT stage to a PNG.",
    "data": "Validate a conversation data set before submission.",
    "fp8-to-bf16": "Dequantise DeepSeek-V3's released FP8 weights to BF16.",
    "export": "Export a run's converted model: `export gguf RUN --type q4_k_m` for llama.cpp / Ollama.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(VERBS)

    def get_command(self, ctx, name):
        if name not in VERBS:
            return None
        module = importlib.import_module(f"clusterctl.commands.{VERBS[name]}")
        return getattr(module, "commands", {}).get(name) or module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, SUMMARIES[name]) for name in VERBS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clusterctl")
def cli():
    """Fine-tune DeepSeek-V3/R1 (or any Hugging Face causal LM) on your own cluster.

    \b
    clusterctl submit sft --nodes 32 --cluster cluster.yaml --job job.yaml
    clusterctl status            clusterctl logs RUN --stage sft --node 3
    clusterctl convert           clusterctl deploy --nodes 4
    clusterctl health RUN        clusterctl cancel RUN

    Without --cluster the backend is local (every node a process group on this machine);
    without --job it runs the built-in tiny DeepSeek-V3 pipeline."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"clusterctl: error: {exc}", err=True)
        sys.exit(2)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
