"""Options shared by several verbs."""
import click

runs_dir = click.option("--runs-dir", envvar="CLUSTERCTL_RUNS", type=click.Path(file_okay=False),
                        help="Folder of run folders [env CLUSTERCTL_RUNS; default ./runs or cluster.yaml runs_dir].")
as_json = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
cluster_file = click.option("--cluster", "cluster_file", type=click.Path(dir_okay=False),
                            help="cluster.yaml (default: the local backend on this machine).")
job_file = click.option("--job", "job_file",
                        help="Job spec YAML, or a built-in example name (default: the tiny DeepSeek-V3 job).")
set_job = click.option("--set", "set_job", multiple=True, metavar="KEY=VALUE",
                       help="Override a job-spec value before it is checked, e.g. --set sft.lr=1e-5 "
                            "--set deploy.nodes=2 (repeatable; dotted keys; the value is read as YAML).")
set_cluster = click.option("--set-cluster", "set_cluster", multiple=True, metavar="KEY=VALUE",
                           help="Override a cluster.yaml value before it is checked, e.g. "
                                "--set-cluster slurm.partition=debug (repeatable).")
detach = click.option("--detach", is_flag=True, help="Local backend: return once submitted instead of following.")


def run_options(command):
    """The options of every verb that creates a run: cluster, job, their overrides, runs folder, detach, JSON."""
    for option in reversed((cluster_file, job_file, set_job, set_cluster, runs_dir, detach, as_json)):
        command = option(command)
    return command
