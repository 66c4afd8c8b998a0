"""The Countdown task of the R1-style GRPO recipes: reach a target with each given number used once and
+ - * /. A seeded data generator, and the format and equation rewards in TRL's reward signature.

Completions are model output, so untrusted: equations are parsed with `ast` and evaluated by walking
a whitelist of nodes (numbers, the four operators, unary minus, parentheses); nothing is ever eval'ed.

    python -m clusterctl.training.rl.countdown OUT.jsonl --count 256 --seed 0
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import re
from fractions import Fraction
from pathlib import Path

PROMPT = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
          "The assistant first thinks about the reasoning process in the mind and then provides the user with "
          "the answer.\nUser: Using the numbers {numbers}, create an equation that equals {target}. You can use "
          "basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
          "<think> </think> tags. And return the final answer in <answer> </answer> tags, for example "
          "<answer> (1 + 2) / 3 </answer>.\nAssistant: Let me solve this step by step.\n<think>")
MAX_EQUATION_CHARS = 200          # longer "equations" are refused before parsing (ast recursion, time)
_FORMAT = re.compile(r"^(?:\s*<think>)?(?:(?!</?think>).)*</think>\s*<answer>((?:(?!</?answer>).)*)</answer>\s*$",
                     re.DOTALL)
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def make_problem(rng: random.Random, *, count: int, low: int = 1, high: int = 99) -> dict:
    """numbers + a target reachable with all of them (a random expression tree with integer steps)."""
    while True:
        numbers = [rng.randint(low, high) for _ in range(count)]
        value = Fraction(numbers[0])
        for n in numbers[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (n == 0 or value % n):
                op = "+"
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value / n}[op]
        if value.denominator == 1 and 1 <= value <= 999:
            shuffled = numbers[:]
            rng.shuffle(shuffled)
            return {"numbers": shuffled, "target": int(value)}


def generate(count: int, *, seed: int, min_numbers: int = 3, max_numbers: int = 4) -> list[dict]:
    """`count` rows {prompt, numbers, target}; the same seed gives the same rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        problem = make_problem(rng, count=rng.randint(min_numbers, max_numbers))
        rows.append({"prompt": PROMPT.format(numbers=problem["numbers"], target=problem["target"]), **problem})
    return rows


def completion_text(completion) -> str:
    """A TRL completion: a string, or a message list whose last message holds the text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return ""


def extract_answer(text: str) -> str | None:
    """The text between <answer> tags when the completion is `thoughts</think><answer>…</answer>`."""
    match = _FORMAT.match(text)
    return match.group(1).strip() if match else None


class UnsafeExpression(ValueError):
    """The answer is not an arithmetic expression over number literals."""


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """(exact value, the integer literals used) of + - * / ( ) over integers; anything else is refused.
    Division by zero raises ZeroDivisionError."""
    if len(expression) > MAX_EQUATION_CHARS:
        raise UnsafeExpression(f"longer than {MAX_EQUATION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise UnsafeExpression(f"not an expression: {exc}") from None
    used: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise UnsafeExpression(f"{type(node).__name__} is not allowed")

    return walk(tree.body), used


def format_reward(completions, **_) -> list[float]:
    """1.0 for `…</think>` followed by exactly one `<answer>…</answer>` and nothing after, else 0.0."""
    return [1.0 if extract_answer(completion_text(c)) is not None else 0.0 for c in completions]


def equation_reward(completions, numbers, target, **_) -> list[float]:
    """1.0 when the answer uses each given number exactly once and evaluates to the target, else 0.0."""
    return [_equation_score(completion_text(c), n, t) for c, n, t in zip(completions, numbers, target)]


def _equation_score(text: str, numbers: list[int], target: int) -> float:
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    try:
        value, used = evaluate(answer)
    except (UnsafeExpression, ZeroDivisionError):
        return 0.0
    if sorted(used) != sorted(numbers):
        return 0.0
    return 1.0 if value == target else 0.0


def write_jsonl(rows: list[dict], path: Path) -> None:
    from clusterctl.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.rl.countdown",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_jsonl(generate(args.count, seed=args.seed), Path(args.out))
    print(f"{args.count} Countdown prompts (seed {args.seed}) -> {args.out}")


if __name__ == "__main__":
    main()
