"""`clusterctl submit grpo --nodes 2` with no job file, for real on the local backend: GRPO on Countdown
on 2 nodes -> convert -> vLLM serves the converted model -> health check; then cancel."""
from __future__ import annotations

import pytest
from rl_run import check_builtin_end_to_end

pytestmark = pytest.mark.slow


def test_builtin_countdown_grpo_runs_end_to_end(clusterctl, tmp_path):
    check_builtin_end_to_end(clusterctl, tmp_path, "grpo", ("rewards/format_reward/mean", "rewards/equation_reward/mean",
                                                           "reward_std", "completions/mean_length", "tokens_per_s"))
