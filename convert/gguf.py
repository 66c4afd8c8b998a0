"""A converted Hugging Face folder -> one GGUF file (llama.cpp, Ollama), written atomically.

The tools are llama.cpp's, from llama-cpp-python's source distribution (install.sh builds them once into
`<venv>/llama.cpp-<version>/`): `convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`
writes f32/f16/bf16/q8_0 directly; q4_k_m is f16 first, then `llama-quantize`. LoRA runs export their
merged model: llama.cpp's LoRA-to-GGUF path mishandles DeepSeek's MLA (a kv_b_proj adapter fails).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clusterctl.atomic import MARKER, atomic_write_text, fsync_dir, is_complete
from clusterctl.errors import UserError

LLAMA_CPP_VERSION = "0.3.36"     # llama-cpp-python's sdist install.sh builds from (its vendored llama.cpp)
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
QUANTISED = {"q4_k_m": "Q4_K_M"}   # type -> llama-quantize's name; converted from f16 first
PROGRESS_S = 10.0                  # how often a running tool's latest line is shown
INSTALL_FIX = ("run install.sh (it builds llama.cpp's llama-quantize and llama-server from llama-cpp-python "
               f"{LLAMA_CPP_VERSION}'s source and installs its converter), or set CLUSTERCTL_LLAMA_CPP to such a folder")


@dataclass(frozen=True)
class Toolchain:
    """An installed llama.cpp: converter folder (convert_hf_to_gguf.py, conversion/, gguf-py/) + binaries."""

    root: Path

    @property
    def converter(self) -> Path:
        return self.root / "convert"

    @property
    def quantize(self) -> Path:
        return self.root / "bin" / "llama-quantize"

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"


def toolchain_dir() -> Path:
    """$CLUSTERCTL_LLAMA_CPP, else `llama.cpp-<version>` inside this interpreter's venv (where install.sh puts it)."""
    return Path(os.environ.get("CLUSTERCTL_LLAMA_CPP") or Path(sys.prefix) / f"llama.cpp-{LLAMA_CPP_VERSION}")


def find_toolchain() -> Toolchain:
    tools = Toolchain(toolchain_dir())
    if not is_complete(tools.root):
        raise UserError(f"llama.cpp {LLAMA_CPP_VERSION} is not installed at {tools.root} (no {MARKER})",
                        fix=INSTALL_FIX)
    return tools


def check_type(gguf_type: str) -> str:
    if gguf_type not in TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}", fix=f"use one of {', '.join(TYPES)}")
    return gguf_type


def default_path(run_dir: Path, gguf_type: str) -> Path:
    """`<run>/export/<run id>-<type>.gguf`: where `clusterctl export gguf` writes and deploy looks."""
    return run_dir / "export" / f"{run_dir.name}-{gguf_type}.gguf"


def modelfile_path(gguf: Path) -> Path:
    return gguf.with_suffix(".Modelfile")


def _run(argv: list[str], what: str, progress: Callable[[str], None]) -> None:
    """Run a tool, passing its latest line on to `progress` every PROGRESS_S (a 671B conversion takes hours);
    on failure a UserError with the end of what it printed (INFO lines left out)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    tail: deque[str] = deque(maxlen=12)
    shown = time.monotonic()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:          # text mode: tqdm's \r counts as a line end
            line = line.strip()
            if line and not line.startswith("INFO:"):
                tail.append(line)
            if line and time.monotonic() - shown >= PROGRESS_S:
                progress(f"  {what}: {line[:160]}")
                shown = time.monotonic()
    if proc.returncode != 0:
        lines = "\n    ".join(tail)
        raise UserError(f"{what} failed (exit {proc.returncode}):\n    {lines}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def export_gguf(model_dir: Path, out: Path, gguf_type: str, *,
                progress: Callable[[str], None] = lambda line: None) -> dict:
    """Write `out` (and its Modelfile) from a complete HF folder; returns what was written."""
    check_type(gguf_type)
    if not is_complete(model_dir):
        raise UserError(f"{model_dir} is not a complete converted model (no {MARKER})",
                        fix="run `clusterctl convert RUN` first (LoRA runs: it merges the adapter into the base)")
    tools = find_toolchain()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    f16 = out.parent / f".{out.name}.f16-{os.getpid()}"
    try:
        direct = f16 if gguf_type in QUANTISED else partial
        progress(f"converting {model_dir} -> {out.name} ({'f16' if gguf_type in QUANTISED else gguf_type})")
        _run([sys.executable, "-m", "clusterctl.convert.gguf_convert", str(tools.converter), str(model_dir),
              "--outtype", "f16" if gguf_type in QUANTISED else gguf_type, "--outfile", str(direct)],
             "llama.cpp's convert_hf_to_gguf.py", progress)
        if gguf_type in QUANTISED:
            progress(f"quantising f16 -> {gguf_type} (llama-quantize)")
            _run([str(tools.quantize), str(f16), str(partial), QUANTISED[gguf_type]], "llama-quantize", progress)
        _fsync_file(partial)
        os.replace(partial, out)
        fsync_dir(out.parent)
    finally:
        partial.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
    from clusterctl.convert.modelfile import modelfile_text

    modelfile = modelfile_path(out)
    atomic_write_text(modelfile, modelfile_text(out, model_dir))
    progress(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) and {modelfile.name}")
    return {"gguf": str(out), "type": gguf_type, "bytes": out.stat().st_size, "modelfile": str(modelfile),
            "model": str(model_dir), "seconds": round(time.monotonic() - started, 2)}
