"""pdsh/Slurm host lists: "node[01-03,07],gpu5" -> ["node01", "node02", "node03", "node07", "gpu5"]."""
from __future__ import annotations

import re

from clusterctl.errors import ConfigError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(text: str, *, where: str = "hosts") -> list[str]:
    """Expand every bracket range (zero padding kept), left to right; commas outside brackets split."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        hosts.extend(_expand_one(part.strip(), where))
    seen = set()
    duplicates = [h for h in hosts if h in seen or seen.add(h)]
    if duplicates:
        raise ConfigError(f"host {duplicates[0]!r} is listed twice", where=where)
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def _expand_one(pattern: str, where: str) -> list[str]:
    match = _BRACKET.search(pattern)
    if not match:
        if "[" in pattern or "]" in pattern or not re.fullmatch(r"[A-Za-z0-9_.@:-]+", pattern):
            raise ConfigError(f"bad host name or list {pattern!r}", where=where,
                              fix='write hosts like "node07" or "node[01-32]"')
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    names = []
    for item in match.group(1).split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            names.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            names.extend(str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ConfigError(f"bad range {item!r} in {pattern!r}", where=where, fix='use ranges like "[01-32]"')
    return [host for name in names for host in _expand_one(f"{head}{name}{tail}", where)]
