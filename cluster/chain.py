"""`model: run:<RUN>` — train on an earlier run's converted model (SFT, then GRPO: the R1 recipe).
RUN is a run id under the runs folder (CLUSTERCTL_RUNS, else ./runs) or a run folder's path."""
from __future__ import annotations

from pathlib import Path

from clusterctl.errors import ConfigError

PREFIX = "run:"


def resolve_run_model(value: str, where: str) -> str:
    """The Hugging Face folder the named run's convert stage completed."""
    from clusterctl.atomic import MARKER
    from clusterctl.run import find_run

    name = value[len(PREFIX):].strip()
    if not name:
        raise ConfigError("run: names no run", where=where, fix="write model: run:<RUN ID> (see `clusterctl runs`)")
    try:
        run = find_run(None, name)
    except Exception as exc:  # noqa: BLE001 - find_run's UserError, or a damaged run.json, becomes a spec error
        raise ConfigError(f"model {value!r}: {exc}", where=where,
                          fix="name a run id under the runs folder (CLUSTERCTL_RUNS) or a run folder's path") from None
    convert = run.read()["stages"].get("convert") or {}
    output = convert.get("output")
    if convert.get("state") != "COMPLETED" or not output:
        raise ConfigError(f"run {run.id} has no completed convert stage (its state: {convert.get('state', 'none')})",
                          where=where, fix=f"wait for it, or run `clusterctl convert {run.id}` first")
    if not (Path(output) / MARKER).is_file():
        raise ConfigError(f"{output} is not a complete model folder (no {MARKER})", where=where,
                          fix=f"convert run {run.id} again")
    return output
