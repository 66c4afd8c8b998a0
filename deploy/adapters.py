"""Serving LoRA adapters beside their base model with vLLM (`deploy.lora: adapters`), each by its own name.

    python -m clusterctl.deploy.adapters --model BASE --gpus-per-node G --adapter NAME=PATH ... [--null]
    python -m clusterctl.deploy.adapters --run-model MERGED --name NAME [--adapter NAME=PATH ...] [--null]

prints the flags to append to `vllm serve`: `--enable-lora --max-lora-rank R --max-loras N --lora-modules ...`;
with --run-model (the deploy stage's `deploy.lora: adapters`) it first prints the model vLLM loads and its served
name, then the flags: for a LoRA run's convert output, the base it was merged from as NAME-base and the run's own
adapter (`MERGED-adapter`) as NAME; for any other folder, that folder as NAME. At submit, `run:<RUN>` entries
(`deploy.adapters`, `clusterctl deploy --adapter`) become the adapter folders those runs' convert stages wrote.
MoE models: vLLM's CPU build has no MoE LoRA path (it is Triton-only: the first request fails with
`triton.language has no attribute bfloat16`), so adapters on a MoE base are refused on CPU nodes (serve the
merged model instead); on GPUs an adapter that trained fused 3-D experts (peft `target_parameters`, the SFT
stage's `<tag>/adapter`) needs `--enable-mixed-moe-lora-format` and `is_3d_lora_weight` in its module entry.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from clusterctl.errors import ConfigError, UserError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)    # the values vLLM accepts for --max-lora-rank
RUN_PREFIX = "run:"                                          # an adapter named by the run that trained it


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str

    @classmethod
    def parse(cls, text: str, where: str = "--adapter") -> Adapter:
        """NAME=PATH, NAME=run:<RUN> or run:<RUN> (served as the run's id)."""
        if text.startswith(RUN_PREFIX):
            name, sep, path = Path(text[len(RUN_PREFIX):].rstrip("/")).name, "=", text
        else:
            name, sep, path = text.partition("=")
        if not sep or not name or not path or path == RUN_PREFIX:
            raise ConfigError(f"expected NAME=PATH, run:<RUN> or NAME=run:<RUN>, got {text!r}", where=where,
                              fix="e.g. --adapter math=/runs/R/adapter, --adapter run:<RUN ID> or --adapter math=run:<RUN ID>")
        return cls(name, path)

    @property
    def run(self) -> str:
        """The run named by a `run:<RUN>` reference ("" for a folder path)."""
        return self.path[len(RUN_PREFIX):] if self.path.startswith(RUN_PREFIX) else ""

    def config(self) -> dict:
        path = Path(self.path) / "adapter_config.json"
        if not path.is_file():
            raise UserError(f"adapter {self.name!r}: {path} is missing", where=self.path,
                            fix="give a peft adapter folder (a LoRA run's convert/model-adapter or <tag>/adapter)")
        return json.loads(path.read_text())

    def rank(self) -> int:
        config = self.config()
        return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])

    def fused_experts(self) -> bool:
        return bool(self.config().get("target_parameters"))


def is_moe(model_config: dict) -> bool:
    return any(model_config.get(key) for key in ("n_routed_experts", "num_local_experts", "num_experts"))


def check(adapters: list[Adapter], *, model_config: dict, gpus_per_node: int, where: str) -> None:
    """Refuse what vLLM cannot serve, before anything runs."""
    names = [a.name for a in adapters]
    if not adapters:
        raise ConfigError("deploy.lora: adapters names no adapter", where=where, fix="add deploy.adapters entries")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat: {names}", where=where, fix="give each adapter its own name")
    if is_moe(model_config) and not gpus_per_node:
        raise ConfigError("vLLM's CPU build cannot serve LoRA adapters on a MoE model (its MoE LoRA kernels are "
                          "Triton-only, GPU)", where=where,
                          fix="serve the merged model (deploy.lora: merged, the default), or deploy on GPU nodes")


def lora_args(adapters: list[Adapter], *, model_config: dict) -> list[str]:
    rank = max(a.rank() for a in adapters)
    if rank > VLLM_LORA_RANKS[-1]:
        raise UserError(f"LoRA rank {rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}", where="deploy.adapters",
                        fix="serve that adapter merged (deploy.lora: merged)")
    args = ["--enable-lora", "--max-lora-rank", str(next(r for r in VLLM_LORA_RANKS if r >= rank)),
            "--max-loras", str(len(adapters))]
    mixed = is_moe(model_config) and any(a.fused_experts() for a in adapters)
    if mixed:
        args.append("--enable-mixed-moe-lora-format")
    args.append("--lora-modules")
    for a in adapters:
        if mixed:
            args.append(json.dumps({"name": a.name, "path": a.path, **({"is_3d_lora_weight": True}
                                                                        if a.fused_experts() else {})}))
        else:
            args.append(f"{a.name}={a.path}")
    return args


def lora_source(folder: str) -> str | None:
    """The base model a LoRA run's merged folder was made from (its completeness marker says); None for any
    other folder (a base model, a full-SFT conversion, an unfinished merge)."""
    from clusterctl.atomic import MARKER

    marker = Path(folder) / MARKER
    info = json.loads(marker.read_text()) if marker.is_file() else {}
    return info.get("source") if isinstance(info, dict) and "adapter" in info else None


def served_base(model: str) -> str:
    """The folder vLLM loads when deploying `model` with adapters: a LoRA merge's base, else `model` itself."""
    return lora_source(model) or model


def same_model(a: str, b: str) -> bool:
    """The same model folder: one path, or config.json files with the same sha256 (a copy of the base)."""
    import hashlib

    if Path(a).expanduser().resolve() == Path(b).expanduser().resolve():
        return True
    configs = [Path(x).expanduser() / "config.json" for x in (a, b)]
    return all(c.is_file() for c in configs) and len({hashlib.sha256(c.read_bytes()).hexdigest() for c in configs}) == 1


def run_adapter(adapter: Adapter, *, base: str, runs_dir: str | Path | None, where: str) -> Adapter:
    """`NAME=run:<RUN>` -> NAME=the peft adapter folder RUN's convert stage wrote, checked before anything
    runs: the run exists, its convert stage merged a LoRA adapter and wrote it whole in peft's format, it was
    trained on the base served here, and vLLM takes its rank."""
    from clusterctl.atomic import MARKER
    from clusterctl.run import find_run

    try:
        run = find_run(runs_dir, adapter.run)
        convert = run.read()["stages"].get("convert") or {}
    except (UserError, OSError, ValueError, KeyError, TypeError) as error:
        detail, fix = str(error).split("\n  fix: ")[0], getattr(error, "fix", None)
        raise ConfigError(f"adapter {adapter.name!r}: {detail}", where=where, fix=fix or "name a run id under the "
                          "runs folder (`clusterctl runs`) or a run folder's path") from None
    output = str(convert.get("output") or "")
    if not output or not (Path(output) / MARKER).is_file():
        raise ConfigError(f"adapter {adapter.name!r}: run {run.id} has no completed convert stage "
                          f"({convert.get('state', 'none')}; no {MARKER} in {output or 'its output'})", where=where,
                          fix=f"wait for it (`clusterctl status {run.id}`), or run `clusterctl convert {run.id}`")
    source = lora_source(output)
    if source is None:
        raise ConfigError(f"adapter {adapter.name!r}: run {run.id} is not a LoRA run (its convert stage merged no "
                          "adapter)", where=where, fix="name a run trained with sft.method: lora or qlora")
    folder = output.rstrip("/") + "-adapter"
    missing = [f for f in ("adapter_config.json", "adapter_model.safetensors") if not (Path(folder) / f).is_file()]
    if missing:
        raise ConfigError(f"adapter {adapter.name!r}: run {run.id}'s peft adapter {folder} is incomplete "
                          f"({', '.join(missing)} missing)", where=where,
                          fix=f"convert the run again: `clusterctl convert {run.id}`")
    if not same_model(source, base):
        raise ConfigError(f"adapter {adapter.name!r}: run {run.id} trained on {source}, but this deploy serves the "
                          f"base {base} (another path and another config.json)", where=where,
                          fix="serve adapters only beside the base model they were trained on")
    resolved = Adapter(adapter.name, folder)
    if resolved.rank() > VLLM_LORA_RANKS[-1]:
        raise ConfigError(f"adapter {adapter.name!r}: run {run.id}'s rank {resolved.rank()} is above vLLM's limit "
                          f"{VLLM_LORA_RANKS[-1]}", where=where, fix="serve it merged (deploy.lora: merged)")
    return resolved


def resolve_runs(job, *, stages: list[str], model: str | None, runs_dir: str | Path | None) -> None:
    """At submit: replace deploy.adapters' run references by the folders they name (checked, run_adapter), so the
    rendered script and the job snapshot hold paths. `model` is what the deploy stage serves when it runs alone."""
    spec = job.deploy
    adapters = [Adapter.parse(text, where=spec.adapters_at) for text in spec.adapters]
    if "deploy" not in stages or spec.lora != "adapters" or not any(a.run for a in adapters):
        return
    trained = [s for s in stages if s not in ("convert", "deploy")]
    if model is None and trained and (job.kind != "sft" or job.sft.method == "full"):
        raise ConfigError(f"other runs' adapters are served on their base model, which this run's {trained[0]} "
                          "stage replaces", where=spec.adapters_at,
                          fix="train with sft.method: lora, or serve them with `clusterctl deploy --model BASE "
                              "--adapter run:<RUN>`")
    if model is None:                                        # the chain's input (`model: run:<RUN>`: its folder)
        from clusterctl.chain import resolve_run_model
        model = resolve_run_model(job.model, spec.adapters_at) if job.model.startswith(RUN_PREFIX) else job.model
        base = model if trained else served_base(model)      # a LoRA stage here trains on the input itself
    else:
        base = served_base(model)
    spec.adapters = [f"{a.name}={a.path}" if not a.run else
                     f"{a.name}={run_adapter(a, base=base, runs_dir=runs_dir, where=spec.adapters_at).path}"
                     for a in adapters]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.adapters", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="the base model folder vLLM serves")
    parser.add_argument("--run-model", help="a LoRA run's merged folder: serve its base and its adapter")
    parser.add_argument("--name", default="lora", help="the served name of --run-model's adapter")
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--adapter", action="append", default=[], help="NAME=PATH (repeat for more)")
    parser.add_argument("--null", action="store_true", help="NUL-separated output for `mapfile -d ''`")
    options = parser.parse_args(argv)
    try:
        adapters = [Adapter.parse(text) for text in options.adapter]
        model, first = options.model, []
        if options.run_model:    # a LoRA merge: its base, its own adapter as NAME; any other model: it as NAME
            model = served_base(options.run_model)
            own = model != options.run_model
            if own:
                adapters.insert(0, Adapter(options.name, options.run_model.rstrip("/") + "-adapter"))
            first = [model, f"{options.name}-base" if own else options.name]
        if not model:
            raise UserError("give --model or --run-model", where="python -m clusterctl.deploy.adapters")
        config = json.loads((Path(model) / "config.json").read_text())
        check(adapters, model_config=config, gpus_per_node=options.gpus_per_node, where="deploy.adapters")
        args = first + lora_args(adapters, model_config=config)
    except (UserError, OSError, ValueError) as error:
        print(f"adapters: {error}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(arg + "\0" for arg in args) if options.null else " ".join(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
