"""Run a command and measure wall time, peak RSS and peak anonymous memory of its whole process tree.

Max RSS counts memory-mapped file pages (a converter that maps a 5 GB checkpoint shows 5 GB of RSS
without needing it); RssAnon is what the process really allocates.  Both are sampled from /proc every few
milliseconds over every process of the tree and summed.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass
class Measured:
    wall_s: float
    peak_rss: int
    peak_anon: int
    returncode: int
    output: str


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem(pid: int) -> tuple[int, int]:
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


def measure(cmd: list[str], env: dict | None = None, timeout: float = 3600, interval: float = 0.005) -> Measured:
    peak = [0, 0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    stop = threading.Event()

    def sample():
        tick = 0
        pids = [proc.pid]
        while not stop.is_set():
            if tick % 20 == 0:                     # re-walk the tree every 20 samples (it is slow-ish)
                pids = _tree(proc.pid)
            tick += 1
            rss = anon = 0
            for p in pids:
                r, a = _mem(p)
                rss, anon = rss + r, anon + a
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(interval)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
    return Measured(wall, peak[0], peak[1], proc.returncode, out)
