"""clusterctl convert / deploy: one stage alone, fed by an earlier run or by a given folder."""
import click

from clusterctl.commands import options
from clusterctl.commands.submit import finish


def _run_alone(stage, run, overrides, nodes, cluster_file, job_file, set_job, set_cluster, runs_dir, detach, as_json,
               job_flags=()):
    from clusterctl.submit import submit_stage_alone

    new = submit_stage_alone(stage, base_run=run, runs_dir=runs_dir, cluster_file=cluster_file,
                             job_file=job_file, overrides={k: v for k, v in overrides.items() if v}, nodes=nodes,
                             job_set=set_job, cluster_set=set_cluster, job_flags=job_flags)
    finish(new, dry_run=False, detach=detach, as_json=as_json)


@click.command("convert")
@click.argument("run", required=False)
@click.option("--checkpoint", type=click.Path(exists=True), help="DeepSpeed checkpoint folder (default: RUN's SFT output).")
@click.option("--out", "model_out", type=click.Path(), help="Output model folder (default: in the new run folder).")
@options.run_options
def convert_command(run, checkpoint, model_out, cluster_file, job_file, set_job, set_cluster, runs_dir, detach,
                    as_json):
    """Convert RUN's training checkpoint (default: the newest run) to Hugging Face safetensors."""
    _run_alone("convert", run, {"checkpoint": checkpoint, "model_out": model_out}, None,
               cluster_file, job_file, set_job, set_cluster, runs_dir, detach, as_json)


@click.command("deploy")
@click.argument("run", required=False)
@click.option("--nodes", type=click.IntRange(min=1), help="Nodes to serve from (default: the job spec's).")
@click.option("--model", type=click.Path(exists=True), help="HF model folder (default: RUN's converted model).")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]run:RUN|NAME=PATH",
              help="Serve this LoRA adapter beside the base model (repeat for more): another LoRA run's adapter, "
                   "served as NAME or the run's id, or a peft adapter folder. Sets deploy.lora: adapters.")
@options.run_options
def deploy_command(run, nodes, model, adapters, cluster_file, job_file, set_job, set_cluster, runs_dir, detach,
                   as_json):
    """Serve RUN's converted model (default: the newest run) with Ray + vLLM.

    With --adapter: serve the base model, RUN's own adapter (when RUN is a LoRA run) and the named ones."""
    flags = [("deploy.lora", "adapters", "--adapter"),
             ("deploy.adapters", list(adapters), " ".join(f"--adapter {a}" for a in adapters))] if adapters else []
    _run_alone("deploy", run, {"model": model}, nodes, cluster_file, job_file, set_job, set_cluster, runs_dir,
               detach, as_json, job_flags=tuple(flags))


commands = {"convert": convert_command, "deploy": deploy_command}
