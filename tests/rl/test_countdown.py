"""Countdown's generator and rewards on hand-written completions (a random tiny model scores 0, so the
rewards' correctness is tested here): malformed tags, numbers reused, division by zero, code."""
from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest

from clusterctl.training.rl import countdown
from clusterctl.training.rl.data import BUILTIN_DATA

NUMBERS, TARGET = [3, 5, 7], 22   # 3 * 5 + 7


def score(completion: str, numbers=NUMBERS, target=TARGET) -> tuple[float, float]:
    return (countdown.format_reward([completion])[0],
            countdown.equation_reward([completion], numbers=[numbers], target=[target])[0])


@pytest.mark.parametrize("completion, expected", [
    (" 3 times 5 is 15, plus 7.</think>\n<answer>3 * 5 + 7</answer>", (1.0, 1.0)),
    ("ok</think><answer> (5*3)+7 </answer>\n", (1.0, 1.0)),                 # spaces and parentheses
    ("<think>ok</think>\n<answer>7 + 3 * 5</answer>", (1.0, 1.0)),          # the think tag repeated
    ("ok</think>\n<answer>3 * 5 + 6</answer>", (1.0, 0.0)),                 # wrong result, 6 not given
    ("ok</think>\n<answer>3 * 5 + 7 + 0</answer>", (1.0, 0.0)),             # a number not given
    ("ok</think>\n<answer>3 * 5 * 5 - 3 * 5 - 31</answer>", (1.0, 0.0)),     # numbers used twice
    ("ok</think>\n<answer>(3 + 5) * 7 / (5 - 5)</answer>", (1.0, 0.0)),      # division by zero
    ("ok</think>\n<answer>7 / (5 - 5) + 3</answer>", (1.0, 0.0)),            # division by zero, numbers reused
    ("ok</think>\n<answer>3 * 5</answer>", (1.0, 0.0)),                     # a number left out
    ("ok</think>\n<answer>22</answer>", (1.0, 0.0)),                        # the target itself
    ("<answer>3 * 5 + 7</answer>", (0.0, 0.0)),                             # no </think>
    ("ok</think>\n3 * 5 + 7", (0.0, 0.0)),                                  # no answer tags
    ("ok</think>\n<answer>3 * 5 + 7", (0.0, 0.0)),                          # unclosed
    ("ok</think>\n<answer>3 * 5 + 7</answer> and more", (0.0, 0.0)),        # text after the answer
    ("ok</think>\n<answer>1</answer><answer>3 * 5 + 7</answer>", (0.0, 0.0)),   # two answers
    ("a</think>b</think>\n<answer>3 * 5 + 7</answer>", (0.0, 0.0)),        # two </think>
    ("ok</think>\n<answer>3 * 5 <answer> + 7</answer>", (0.0, 0.0)),       # nested tags
    ("", (0.0, 0.0)),
])
def test_hand_written_completions(completion, expected):
    assert score(completion) == expected


@pytest.mark.parametrize("code", [
    "__import__('os').system('touch /tmp/pwned') or 22",
    "(lambda: 22)()",
    "[3, 5, 7][0] * 5 + 7",
    "open('/etc/passwd')",
    "3 ** 5 + 7",
    "3 * 5 + 7 if True else 0",
    "3.0 * 5 + 7",
    "True * 3 * 5 + 7",
    "3 * 5 + 7; 1",
    "3 * 5 +" + " (" * 500 + "7" + ")" * 500,
])
def test_code_is_refused_not_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert score(f"ok</think>\n<answer>{code}</answer>") == (1.0, 0.0)
    with pytest.raises(countdown.UnsafeExpression):
        countdown.evaluate(code)
    assert not (tmp_path / "pwned").exists() and not __import__("os").path.exists("/tmp/pwned")


def test_evaluator_is_exact():
    assert countdown.evaluate("(7 - 3) / 8 * 6") == (Fraction(3), [7, 3, 8, 6])
    assert countdown.evaluate("-3 + 5")[0] == 2
    with pytest.raises(ZeroDivisionError):
        countdown.evaluate("1 / (2 - 2)")


def test_completions_as_messages():
    message = [{"role": "assistant", "content": "ok</think>\n<answer>3 * 5 + 7</answer>"}]
    assert countdown.format_reward([message]) == [1.0]
    assert countdown.equation_reward([message], numbers=[NUMBERS], target=[TARGET]) == [1.0]


def reachable(numbers: list[int], target: int) -> bool:
    """Brute force: some order and operators reach the target (left-to-right and tree shapes)."""
    def values(nums):
        if len(nums) == 1:
            yield Fraction(nums[0])
            return
        for i in range(1, len(nums)):
            for a in values(nums[:i]):
                for b in values(nums[i:]):
                    yield from (a + b, a - b, a * b)
                    if b:
                        yield a / b
    return any(v == target for order in itertools.permutations(numbers) for v in values(list(order)))


def test_generator_is_seeded_and_solvable():
    rows = countdown.generate(20, seed=7)
    assert rows == countdown.generate(20, seed=7) and rows != countdown.generate(20, seed=8)
    for row in rows:
        assert 3 <= len(row["numbers"]) <= 4 and row["prompt"].endswith("<think>")
        assert str(row["numbers"]) in row["prompt"] and f"equals {row['target']}" in row["prompt"]
        assert reachable(row["numbers"], row["target"]), row


def test_shipped_file_is_the_seeded_generator_output():
    lines = BUILTIN_DATA["builtin:countdown"].read_text().splitlines()
    assert [json.loads(line) for line in lines] == countdown.generate(len(lines), seed=0)
