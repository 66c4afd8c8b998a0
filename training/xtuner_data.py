"""Conversations -> the reference recipe's training JSONL, the input of the xtuner engine.

    python -m clusterctl.training.xtuner_data IN.jsonl OUT.jsonl

xtuner's `openai_map_fn` reads `{"messages": [...]}` with a per-assistant `loss` flag but knows nothing of
`reasoning_content`: it is folded into the content as `<think>\\n…\\n</think>\\n\\n` (REFERENCE.md "Data",
the step the recipe ships no converter for). Bad lines are reported like `clusterctl data check` does and
nothing is written. Pure Python: the xtuner environment has its own, older torch/transformers.
"""
from __future__ import annotations

import argparse
import json
import sys

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import UserError
from clusterctl.training.data import assistant_text, read_records, resolve_data_path


def recipe_message(message: dict) -> dict:
    if message["role"] != "assistant":
        return {"role": message["role"], "content": message["content"]}
    return {"role": "assistant", "content": assistant_text(message), "loss": message.get("loss", True)}


def convert(source: str, target: str) -> int:
    path = resolve_data_path(source)
    records = read_records(path)
    bad = [f"{r.where}: {r.error}" for r in records if r.error]
    if bad:
        raise UserError(f"{len(bad)} conversation(s) cannot be trained on:\n  " + "\n  ".join(bad), where=str(path),
                        fix=f"fix them (`clusterctl data check {path}` lists them all)")
    lines = [json.dumps({"messages": [recipe_message(m) for m in r.messages]}, ensure_ascii=False) for r in records
             if r.messages is not None]     # all of them: any bad record was refused above
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.xtuner_data", description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.target)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{count} conversations -> {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
