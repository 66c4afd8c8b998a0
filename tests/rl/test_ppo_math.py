"""PPO's arithmetic (training/rl/ppo_math.py) on hand-made tensors: whitening, GAE against a hand-computed
example, the per-token KL reward, the clipped policy and value losses (clipping active, and no gradient
through clipped tokens), the adaptive KL coefficient."""
from __future__ import annotations

import pytest
import torch

from clusterctl.training.rl import ppo_math


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


def test_whitened_advantages_have_mean_0_and_std_1_over_real_tokens_and_padding_stays_0():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 5
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]], dtype=torch.float)
    white = ppo_math.whiten(values, mask)
    real = white[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(white[~mask.bool()] == 0)
    kept = ppo_math.whiten(values, mask, shift_mean=False)[mask.bool()]     # rewards keep their mean
    assert kept.mean().item() == pytest.approx(values[mask.bool()].mean().item(), abs=1e-4)


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 9.0]])   # row 2 ends after 2 tokens: its 9.0 is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: delta_2 = 2 - 0.1 = 1.9; delta_1 = 0.9*0.1 - 0.2 = -0.11; delta_0 = 1 + 0.9*0.2 - 0.5 = 0.68
    a2 = 1.9
    a1 = -0.11 + 0.72 * a2
    a0 = 0.68 + 0.72 * a1
    # row 2: the episode ends at token 1 (no value after it): delta_1 = -0.2, delta_0 = 0.68
    b1 = -0.2
    b0 = 0.68 + 0.72 * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.2, a2 + 0.1], [b0 + 0.5, b1 + 0.2, 0.0]])


def test_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo_math.token_rewards(torch.tensor([10.0, 20.0]), logprobs, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, 0.0, -1.0], [0.0, 2.0, 0.0]])
    close(rewards, [[-0.05, 0.0, 10.1], [0.0, 20.0 - 0.2, 0.0]])


def test_policy_clipping_is_active_beyond_cliprange_and_clipped_tokens_get_no_gradient():
    old = torch.zeros(1, 4)
    # ratios e^0.5 ~ 1.65 (beyond 1.2), e^0.1 ~ 1.1 (within), e^-0.5 ~ 0.61 (below 0.8), e^-0.5 with A < 0
    moved = torch.tensor([[0.5, 0.1, -0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    out = ppo_math.policy_loss(old + moved, old, advantages, mask, cliprange=0.2)
    out.loss.backward()
    grad = moved.grad[0]
    # token 0 (A > 0, ratio above 1 + e) and token 3 (A < 0, ratio below 1 - e) are clipped: no gradient
    assert grad[0].item() == 0 and grad[3].item() == 0
    # token 1 is inside the range; token 2 (A > 0, ratio fell) keeps the pessimistic unclipped term
    assert grad[1].item() != 0 and grad[2].item() != 0
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.approx_kl.item() == pytest.approx(0.5 * (0.25 + 0.01 + 0.25 + 0.25) / 4)
    unmoved = ppo_math.policy_loss(old, old, advantages, mask, cliprange=0.2)
    assert unmoved.clipfrac.item() == 0 and unmoved.approx_kl.item() == 0
    assert unmoved.loss.item() == pytest.approx(-advantages.mean().item())


def test_value_clipping_holds_the_critic_within_cliprange_value_of_the_rollout_values():
    old = torch.zeros(1, 3)
    returns = torch.ones(1, 3)
    values = torch.tensor([[0.5, 0.1, 2.0]], requires_grad=True)
    loss, clipfrac = ppo_math.value_loss(values, old, returns, torch.ones(1, 3), cliprange_value=0.2)
    loss.backward()
    # 0.5: clipped to 0.2, whose error (0.64) exceeds its own (0.25): clipped, no gradient
    # 0.1: inside the range; 2.0: beyond it, but its own error (1.0) is the larger one
    assert values.grad[0].tolist()[0] == 0 and values.grad[0, 1] != 0 and values.grad[0, 2] != 0
    assert clipfrac.item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3)


def test_kl_coefficient_fixed_or_adapted_toward_the_target():
    fixed = ppo_math.KLController(0.1)
    fixed.update(5.0, 64)
    assert fixed.value == 0.1
    adaptive = ppo_math.KLController(0.1, target=1.0, horizon=100)
    adaptive.update(5.0, 50)                    # far above target: up by at most 20% x 50/100
    assert adaptive.value == pytest.approx(0.1 * 1.1)
    adaptive.update(0.0, 50)
    assert adaptive.value == pytest.approx(0.1 * 1.1 * 0.9)
