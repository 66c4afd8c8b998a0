"""The user's reward functions: specs checked at submit (file, function, signature against the data's
columns), and on the nodes a raising reward names the function, the sample and the exception."""
from __future__ import annotations

import textwrap

import pytest

from clusterctl.errors import ConfigError
from clusterctl.training.rl import rewards

USER_FILE = textwrap.dedent('''
    def good(completions, target, **kwargs):
        return [float(len(c) == t) for c in completions for t in [target[0]]]

    def needs_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    def no_kwargs(completions, target):
        return [0.0] * len(completions)

    def fragile(completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    def returns_text(completions, **kwargs):
        return ["high"] * len(completions)

    def maybe(completions, **kwargs):
        return [None] * len(completions)
''')


@pytest.fixture
def user_file(tmp_path):
    (tmp_path / "my_rewards.py").write_text(USER_FILE)
    return tmp_path


def check(user_file, name, columns=("prompt", "target")):
    return rewards.load_checked([f"my_rewards.py:{name}"], list(columns), base=user_file, where="job.yaml: grpo.rewards")


def test_good_spec_resolves_to_an_absolute_file(user_file):
    (spec,) = check(user_file, "good")
    assert spec.source == str(user_file / "my_rewards.py") and spec.function == "good"
    (module_spec,) = rewards.load_checked(["clusterctl.training.rl.countdown:format_reward"], ["prompt"],
                                          base=user_file, where="w")
    assert not module_spec.is_file


@pytest.mark.parametrize("spec, message", [
    ("my_rewards.py", "is not FILE.py:FUNCTION"),
    ("missing.py:good", "reward file .*missing.py does not exist"),
    ("my_rewards.py:absent", "has no function 'absent'(.|\n)*functions there: fragile, good, maybe, needs_answer, no_kwargs, returns_text"),
    ("my_rewards.py:needs_answer", "needs answer, which the data set does not provide"),
    ("my_rewards.py:no_kwargs", "does not accept completion_ids, log_extra, log_metric, prompts, trainer_state"),
    ("no.such.module:f", "cannot import module 'no.such.module'"),
])
def test_bad_specs_are_refused_at_submit(user_file, spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        rewards.load_checked([spec], ["prompt", "target"], base=user_file, where="job.yaml:7: grpo.rewards")
    assert "job.yaml:7: grpo.rewards[0]" in str(info.value)


def test_a_module_that_fails_to_import_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed: ModuleNotFoundError"):
        rewards.load_checked(["broken.py:f"], ["prompt"], base=tmp_path, where="w")


def test_raising_reward_names_function_sample_and_exception(user_file):
    (spec,) = check(user_file, "fragile")
    (func,) = rewards.load_guarded([str(spec)])
    assert func.__name__ == "fragile"      # TRL logs rewards/<name>/mean
    assert func(prompts=["p", "q"], completions=["ab", "abcd"], completion_ids=[[1], [2]]) == [0.5, 0.25]
    with pytest.raises(rewards.RewardError) as info:
        func(prompts=["p1", "p2", "p3"], completions=["ok", "", "x"], completion_ids=[[], [], []])
    text = str(info.value)
    assert "fragile raised ZeroDivisionError: float division by zero" in text
    assert "sample 1: prompt 'p2', completion ''" in text


def test_bad_return_values_are_named(user_file):
    (spec,) = check(user_file, "returns_text")
    (func,) = rewards.load_guarded([str(spec)])
    with pytest.raises(rewards.RewardError, match=r"returned 'high' for sample 0"):
        func(prompts=["p"], completions=["c"])
    (maybe,) = rewards.load_guarded([str(check(user_file, "maybe")[0])])
    assert maybe(prompts=["p"], completions=["c"]) == [None]
