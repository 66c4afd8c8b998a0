"""DeepSpeed's C++ ops on the nodes: compile none that training does not call, and say so before one is.

On the CPU accelerator DeepSpeed's communication backend compiles `deepspeed_shm_comm` (gcc, 60-80 s,
cached per user in ~/.cache/torch_extensions) the first time it starts, although only
`inference_all_reduce` (AutoTP inference) calls it: training's collectives are plain torch.distributed
calls. A newcomer's first run sat silent for minutes over it, and a run killed during that build leaves
a `lock` file that makes every later run wait for ever. `skip_unused_ops` marks it incompatible, the
state DeepSpeed already handles on machines that cannot build it (it then uses the process group).
`announce_build` prints one line before an op training does need (CPU Adam, for optimizer offload) is
compiled, so a long silence has a reason in the node log.
"""
from __future__ import annotations

import os
from pathlib import Path

UNUSED_IN_TRAINING = ("deepspeed_shm_comm",)
BUILD_MINUTES = {"cpu_adam": 2}            # measured on 2 cores (shared/RECIPES.md §4.4)


def skip_unused_ops() -> None:
    """Call before `deepspeed.init_distributed`. DeepSpeed keeps its op compatibility table as one
    module-level dict that stays edited; if a release drops it, the op is simply built as before."""
    import deepspeed.ops

    try:
        table = deepspeed.ops.__compatible_ops__
    except AttributeError:
        return
    for name in UNUSED_IN_TRAINING:
        table[name] = False


def build_dir(name: str) -> Path | None:
    """Where torch's JIT build of op `name` lives (None when DeepSpeed ships it compiled)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(name):
        return None
    return Path(_get_build_directory(name, verbose=False))


def announce_build(name: str) -> None:
    """One line in the node log when op `name` is about to be compiled (not yet in the JIT cache)."""
    where = build_dir(name)
    if where is None or (where / f"{name}.so").exists():
        return
    minutes = BUILD_MINUTES.get(name, 2)
    print(f"[clusterctl] rank {os.environ.get('RANK', '0')}: compiling DeepSpeed's {name} op (first use on this machine only, "
          f"about {minutes} min on 2 cores) into {where}; if this waits much longer, a build killed "
          f"earlier may have left {where / 'lock'}: remove it", flush=True)
