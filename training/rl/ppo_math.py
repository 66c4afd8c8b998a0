"""The arithmetic of PPO (Schulman et al. 2017, as RLHF uses it: Ziegler et al. 2019, Ouyang et al. 2022),
apart from any model so the tests can check it on hand-made tensors.

Shapes: [batch, completion tokens]; `mask` is 1 on a completion's real tokens (up to and including its
EOS) and 0 on the padding after it. Per-token reward = -kl_coef * (log pi - log pi_ref), plus the sequence's
score on its last real token; advantages by GAE over the critic's values, whitened over the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (as torch.var)."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Normalise the masked entries to std 1 (and mean 0 unless shift_mean is False: rewards keep their sign);
    padding stays 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last real completion token (0 for an empty completion)."""
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL estimate log pi - log pi_ref): the KL penalty on every token and the
    sequence score added on its last real token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0])
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns = advantages + values).
    The value after a completion's last real token is 0 (the episode ends there)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask[:, t + 1] if t + 1 < length else 0)
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor          # share of tokens where the clipped term was taken
    approx_kl: torch.Tensor         # 0.5 * E[(log pi - log pi_old)^2]: how far this update moved


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> PolicyLoss:
    """PPO's clipped surrogate: max(-A r, -A clip(r, 1-e, 1+e)), averaged over real tokens. Where the clipped
    term wins, the token's gradient is 0."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return PolicyLoss(loss, clipfrac, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac): 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of the
    rollout's values, so the critic too moves only so far per batch."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_loss > unclipped_loss).float(), mask)
    return loss, clipfrac


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) — moved toward `target` KL per sequence,
    at most 20% of the error per `horizon` sequences."""

    def __init__(self, value: float, *, target: float = 0.0, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, sequences: int) -> None:
        if self.target <= 0:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * sequences / self.horizon
