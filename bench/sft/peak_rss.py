"""Peak resident memory of this process (VmHWM), written per rank for bench_sft.py."""
import json
from pathlib import Path


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_peak_rss(out: Path, rank: int) -> None:
    (Path(out) / f"rss-{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_rss_mib()}))
