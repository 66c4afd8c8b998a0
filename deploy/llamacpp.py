"""deploy.engine: llamacpp — llama.cpp's OpenAI-compatible `llama-server` serving the model as GGUF.

On the deploy node, before serving: the GGUF of `deploy.gguf_type` at `<run>/export/<run id>-<type>.gguf`
(where `clusterctl export gguf` writes) is used when it exists, else exported there from the converted model
first; then the server's argv is printed (NUL-separated with --null) for the node script to start.
`check_spec` is what submit refuses: one node, no adapters, no vLLM parallelism.

    python -m clusterctl.deploy.llamacpp --model DIR --run-dir RUN --type f16 --host H --port P \
        [--served-model-name N] [--ctx-size N] [--api-key-file F] [--null] [-- EXTRA...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clusterctl.errors import ConfigError, UserError

ENGINES = ("vllm", "llamacpp")


def check_spec(spec, at) -> None:
    """deploy.engine / deploy.gguf_type, and the combinations llama-server cannot serve (refused at submit)."""
    from clusterctl.convert.gguf import TYPES

    if spec.engine not in ENGINES:
        raise ConfigError(f"unknown engine {spec.engine!r}", where=at("engine"), fix=f"use {' or '.join(ENGINES)}")
    if spec.gguf_type not in TYPES:
        raise ConfigError(f"unknown GGUF type {spec.gguf_type!r}", where=at("gguf_type"),
                          fix=f"use one of {', '.join(TYPES)}")
    if spec.engine != "llamacpp":
        return
    if spec.nodes > 1:
        raise ConfigError(f"llama-server serves from one node, not {spec.nodes}", where=at("nodes"),
                          fix="set deploy.nodes: 1, or deploy.engine: vllm for multi-node serving")
    if spec.lora == "adapters" or spec.adapters:
        raise ConfigError("engine llamacpp serves the merged model only (llama.cpp's LoRA path breaks DeepSeek's "
                          "MLA)", where=at("lora"), fix="set deploy.lora: merged, or deploy.engine: vllm")
    for name in ("tensor_parallel", "pipeline_parallel"):
        if getattr(spec, name) > 1:
            raise ConfigError(f"{name} is vLLM's; llama-server runs one process", where=at(name),
                              fix=f"remove deploy.{name}, or use deploy.engine: vllm")


def server_argv(server: Path, gguf: Path, *, host: str, port: int, served_model_name: str, ctx_size: int,
                api_key_file: str, extra: list[str]) -> list[str]:
    argv = [str(server), "--model", str(gguf), "--host", host, "--port", str(port), "--no-webui", "--jinja"]
    if served_model_name:
        argv += ["--alias", served_model_name]
    if ctx_size:
        argv += ["--ctx-size", str(ctx_size)]
    if api_key_file:   # the key stays in its file: llama-server reads it (never argv, the script or the log)
        argv += ["--api-key-file", str(Path(api_key_file).expanduser())]
    return argv + extra


def prepare(args: argparse.Namespace) -> list[str]:
    """The GGUF (exported now if missing), then llama-server's argv."""
    from clusterctl.convert.gguf import default_path, export_gguf, find_toolchain

    tools = find_toolchain()
    gguf = default_path(Path(args.run_dir), args.type)
    if gguf.is_file():
        print(f"[clusterctl] serving {gguf} (already exported)", file=sys.stderr)
    else:
        export_gguf(Path(args.model), gguf, args.type, progress=lambda line: print(f"[clusterctl] {line}",
                                                                                    file=sys.stderr, flush=True))
    return server_argv(tools.server, gguf, host=args.host, port=args.port, served_model_name=args.served_model_name,
                       ctx_size=args.ctx_size, api_key_file=args.api_key_file, extra=args.extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.llamacpp", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the converted (merged) Hugging Face folder")
    parser.add_argument("--run-dir", required=True, help="the run folder (its export/ holds the GGUF)")
    parser.add_argument("--type", default="f16")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--ctx-size", type=int, default=0)
    parser.add_argument("--api-key-file", default="")
    parser.add_argument("--null", action="store_true", help="NUL-separated output (for mapfile -d '')")
    parser.add_argument("extra", nargs="*", help="after --: more llama-server arguments (deploy.extra_args)")
    args = parser.parse_args(argv)
    try:
        words = prepare(args)
    except UserError as error:
        print(f"clusterctl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.write("".join(w + "\0" for w in words) if args.null else " ".join(words) + "\n")


if __name__ == "__main__":
    main()
