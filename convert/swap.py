"""Swap for the convert job, created only when the chosen converter needs more memory than the node has.

Our streaming converter needs a few times its largest output tensor; xtuner's pth_to_hf (the original
recipe) gathers the whole fp32 model in RAM.  The convert node script calls `up` after registering `down`
on its EXIT trap, so the swap file goes away however the job ends.

    python -m clusterctl.convert.swap up --file F --checkpoint DIR [--engine clusterctl|xtuner] [--need SIZE]
    python -m clusterctl.convert.swap down --file F
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

from clusterctl.errors import UserError

from .units import at_least, parse_size

MIB = 1 << 20
BASE_PER_PROCESS = 1536 * MIB     # python + torch + transformers, measured at ~0.5 GiB: generous
GRANULE = 64 * MIB                # swap files are rounded up to this


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)}


def available_bytes() -> int:
    """What a new process can use without the OOM killer: free-ish RAM plus unused swap."""
    info = meminfo()
    return info["MemAvailable"] + info.get("SwapFree", 0)


def need_bytes(checkpoint: str, engine: str, dtype: str, workers: int) -> int:
    """Peak memory of the conversion, estimated from the checkpoint's own tensor list."""
    if engine == "xtuner":
        # pth_to_hf holds every fp32 master weight at once (REFERENCE.md: 1.4-2.7 TB for 671B); they are
        # a third of Adam's optimizer files (weights, exp_avg, exp_avg_sq).
        return BASE_PER_PROCESS + sum(os.path.getsize(f) for f in _xtuner_optim_files(checkpoint)) // 3
    from .core import open_and_plan, resolve_with_config

    tag_dir, hf_dir = resolve_with_config(checkpoint)
    _, pieces = open_and_plan(tag_dir, hf_dir, dtype)
    # ours: one source slice in fp32 plus its cast, per worker
    largest = max(p.span for p in pieces)
    return workers * (BASE_PER_PROCESS + 3 * 4 * largest)


def _xtuner_optim_files(path: str) -> list[str]:
    """xtuner's work_dir (its `last_checkpoint` file names the newest iter_N.pth folder) or that folder."""
    pointer = os.path.join(path, "last_checkpoint")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            path = f.read().strip()
    files = [os.path.join(path, n) for n in os.listdir(path) if n.endswith("optim_states.pt")] \
        if os.path.isdir(path) else []
    if not files:
        raise UserError("no DeepSpeed *optim_states.pt files", where=path,
                        fix="pass xtuner's work_dir or its iter_N.pth checkpoint folder")
    return files


def _listed(path: str) -> bool:
    with open("/proc/swaps") as f:
        next(f)
        listed = [line.split()[0].replace("\\040", " ") for line in f if line.strip()]
    return os.path.realpath(path) in {os.path.realpath(p) for p in listed}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def up(path: str, deficit: int) -> int:
    """Create and enable a swap file of `deficit` bytes (rounded up); refuse clearly when impossible."""
    size = math.ceil(deficit / GRANULE) * GRANULE
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError("swap folder does not exist", where=folder, fix="create it, or set swap_dir in cluster.yaml")
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    if free < size:
        raise UserError(f"the conversion needs a {size / 2**30:.2f} GiB swap file, the folder has "
                        f"{free / 2**30:.2f} GiB free", where=folder,
                        fix="point cluster.yaml swap_dir at a bigger local disk, or use a node with more RAM")
    down(path)                    # a file left by a job that was killed too hard to run its trap
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)
    for cmd, why in ((["mkswap", path], "mkswap failed"), (["swapon", path], "swapon refused the file (not permitted here, or its file system cannot hold swap)")):
        result = _run(cmd)
        if result.returncode != 0:
            os.unlink(path)
            raise UserError(f"{why}: {result.stderr.strip() or result.stdout.strip()}", where=path,
                            fix="run the convert job as root on a host that allows swap (containers often do "
                                "not), with swap_dir on a local disk (not tmpfs/NFS), or give it a node with "
                                "enough RAM")
    return size


def down(path: str) -> None:
    """Disable and delete the swap file; a no-op when it is already gone."""
    if os.path.exists(path) and _listed(path):
        result = _run(["swapoff", path])
        if result.returncode != 0:
            raise UserError(f"swapoff failed: {result.stderr.strip()}", where=path, fix="run `swapoff` by hand")
    if os.path.exists(path):
        os.unlink(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clusterctl.convert.swap",
                                description="Swap provisioning for the convert job.")
    sub = p.add_subparsers(dest="action", required=True)
    up_ = sub.add_parser("up", help="Create a swap file of the deficit between what the conversion needs and "
                                    "what the node has.")
    up_.add_argument("--file", dest="path", required=True, help="The swap file to create (its folder must exist).")
    up_.add_argument("--checkpoint", help="The checkpoint to be converted (to size the need).")
    up_.add_argument("--engine", choices=["clusterctl", "xtuner"], default="clusterctl")
    up_.add_argument("--dtype", default="bf16")
    up_.add_argument("--workers", type=at_least(1), default=1)
    up_.add_argument("--need", type=parse_size,
                     help="Use this memory need (e.g. 3TB) instead of estimating it from the checkpoint.")
    down_ = sub.add_parser("down", help="Disable and remove the swap file (safe to call when there is none).")
    down_.add_argument("--file", dest="path", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.action == "down":
            down(a.path)
            return 0
        if a.need is None and a.checkpoint is None:
            raise UserError("give --checkpoint (to estimate the need) or --need", where="swap up")
        need_b = a.need if a.need is not None else need_bytes(a.checkpoint, a.engine, a.dtype, a.workers)
        have = available_bytes()
        if need_b <= have:
            print(f"[swap] no swap needed: the {a.engine} conversion needs {need_b / 2**30:.2f} GiB, "
                  f"{have / 2**30:.2f} GiB available", file=sys.stderr)
            return 0
        size = up(a.path, need_b - have)
        print(f"[swap] {a.path}: {size} bytes of swap enabled (need {need_b / 2**30:.2f} GiB, "
              f"available {have / 2**30:.2f} GiB)", file=sys.stderr)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
