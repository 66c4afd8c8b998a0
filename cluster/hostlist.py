"""pdsh/Slurm host lists: "node[01-03,07],gpu5" -> ["node01", "node02", "node03", "node07", "gpu5"]."""
from __future__ import annotations

import re
from collections import Counter

from clusterctl.errors import ConfigError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


MAX_HOSTS = 65536   # more is a typo (node[1-1000000]), and would take seconds and memory to expand


def expand_hostlist(text: str, *, where: str = "hosts") -> list[str]:
    """Expand every bracket range (zero padding kept), left to right; commas outside brackets split."""
    parts = [part.strip() for part in _split_top_level(text)]
    total = sum(_count(part) for part in parts)
    if total > MAX_HOSTS:
        raise ConfigError(f"the host list expands to {total} names, more than {MAX_HOSTS}", where=where,
                          fix='check the ranges, e.g. "node[001-128]"')
    hosts: list[str] = []
    for part in parts:
        hosts.extend(_expand_one(part, where))
    duplicates = [host for host, count in Counter(hosts).items() if count > 1]
    if duplicates:
        raise ConfigError(f"host {duplicates[0]!r} is listed twice", where=where)
    return hosts


def _count(pattern: str) -> int:
    """How many names a pattern expands to, without expanding it (ranges it cannot read count as 1)."""
    total = 1
    for group in _BRACKET.findall(pattern):
        size = 0
        for item in group.split(","):
            bounds = item.split("-")
            digits = all(b.isdigit() for b in bounds)
            size += int(bounds[1]) - int(bounds[0]) + 1 if len(bounds) == 2 and digits else 1
        total *= max(size, 1)
    return total


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
