"""The runs under a runs folder, newest first, from each run.json alone (no backend query, no
other file), so listing hundreds of runs stays instant. States are as last recorded: `clusterctl
status RUN` asks the backend and brings one run up to date."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class RunSummary:
    run: str
    dir: str
    created: float | None = None
    backend: str = ""
    model: str = ""
    stages: dict[str, str] = field(default_factory=dict)     # stage -> state, in chain order
    endpoint: str = ""
    dry_run: bool = False
    error: str = ""                                          # run.json unreadable: what is wrong

    @property
    def states(self) -> set[str]:
        return set(self.stages.values())

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(run_dir: Path) -> RunSummary:
    """One run's summary; a missing, truncated or malformed run.json gives a summary with `error` set."""
    path = run_dir / "run.json"
    try:
        data = json.loads(path.read_text())
        stages = {stage: data["stages"][stage]["state"] for stage in data["chain"]}
        deploy = data["stages"].get("deploy", {})
        return RunSummary(run=run_dir.name, dir=str(run_dir), created=data.get("created"),
                          backend=data.get("backend", ""), model=(data.get("job") or {}).get("model", ""),
                          stages=stages, endpoint=deploy.get("endpoint", "") if deploy.get("state") == "RUNNING"
                          else "", dry_run=bool(data.get("dry_run")))
    except (OSError, UnicodeDecodeError) as exc:
        error = f"cannot read run.json: {exc.strerror if isinstance(exc, OSError) else exc}"
    except json.JSONDecodeError as exc:
        error = f"run.json is not JSON (line {exc.lineno}: {exc.msg})"
    except RecursionError:
        error = "run.json is nested too deeply to be clusterctl's"
    except (KeyError, TypeError, AttributeError) as exc:
        error = f"run.json lacks a field clusterctl writes ({type(exc).__name__}: {exc})"
    return RunSummary(run=run_dir.name, dir=str(run_dir), created=_mtime(path), error=error)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def list_runs(runs_dir: Path, *, state: str | None = None) -> list[RunSummary]:
    """Every run folder (a folder holding run.json) under runs_dir, newest first; `state` keeps the runs
    with at least one stage in that state (case-insensitive; "broken" keeps unreadable ones)."""
    if not runs_dir.is_dir():
        return []
    runs = [summarize(p.parent) for p in runs_dir.glob("[!.]*/run.json")]   # not a `.<id>.partial` being written
    if state:
        wanted = state.upper()
        runs = [r for r in runs if (wanted == "BROKEN" and r.error) or wanted in r.states]
    return sorted(runs, key=lambda r: (r.created or 0.0, r.run), reverse=True)


def age(seconds: float) -> str:
    """'45s', '12m', '3h', '5d': how long ago, in one unit."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def table(runs: list[RunSummary], now: float | None = None) -> str:
    """A fixed-width table: run, age, backend, each stage's state, model, endpoint (or the error)."""
    now = time.time() if now is None else now
    rows = [["RUN", "AGE", "BACKEND", "STAGES", "MODEL", "ENDPOINT"]]
    for r in runs:
        when = age(now - r.created) if r.created else "?"
        if r.error:
            rows.append([r.run, when, "?", "BROKEN", r.error, ""])
            continue
        stages = " ".join(f"{stage}:{state}" for stage, state in r.stages.items())
        rows.append([r.run, when, r.backend + (" (dry run)" if r.dry_run else ""), stages, r.model, r.endpoint])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[-1]]).rstrip() for row in rows)
