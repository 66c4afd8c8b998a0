"""The built-in PPO example's reward (`clusterctl submit ppo`): one a random tiny model can learn within a
few steps, so the run shows PPO working, not only the pipeline. A reward file like any user's: TRL's
reward signature, one float per completion, no eval of model output."""


def target_token_share(completion_ids, **kwargs):
    """The share of completion tokens from the target class (token ids divisible by 4: a quarter of the
    vocabulary, so a random policy starts near 0.25 and PPO pushes it up)."""
    return [sum(i % 4 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]
