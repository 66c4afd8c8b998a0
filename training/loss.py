"""The loss over sequence chunks: the full [tokens x vocabulary] logits are never held at once.

At 32k context and DeepSeek's 129,280-token vocabulary, one micro-batch's logits in bf16, their fp32
copy for the loss and its fp32 gradient are at least 10 bytes x tokens x vocabulary: 19.7 GiB per GPU
at micro-batch 2, sp 4. Here the output projection and the cross-entropy run one chunk of tokens at a
time, under activation checkpointing, so the forward keeps only each chunk's scalar and the backward
recomputes one chunk's logits at a time: peak logits memory is chunk x vocabulary x BYTES_PER_LOGIT
(CHUNK_BYTES), and loss and gradients are those of the full computation (a sum over tokens is a sum
of sums over chunks).

`ChunkedLossHead` takes the place of the model's `lm_head` and owns the same weight Parameter (so
the state-dict name, the ZeRO-3 partitioning and tied embeddings are unchanged; ZeRO-3 gathers it in
the head's own forward and again for its backward). Inside `head.loss_for(labels)` the model's forward
returns the summed token loss in place of logits; outside, the head is an ordinary projection.
No torch import at module level: the planner uses `chunk_tokens`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

CHUNK_BYTES = 1 << 30            # the budget of one chunk's logits and what the loss makes of them
BYTES_PER_LOGIT = 2 + 4 + 4 + 4  # bf16 logits, fp32 copy, log-softmax, its gradient (bench/memory measures 13.7)
IGNORE = -100


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's logits, their fp32 copy and gradient fit in `budget`."""
    return max(1, budget // (vocab * BYTES_PER_LOGIT))


def chunked_loss_sum(hidden, weight, labels, chunk: int, bias=None):
    """Sum of the token cross-entropies (labels IGNORE skipped) of logits = hidden @ weight.T (+ bias),
    computed `chunk` tokens at a time with the logits recomputed in backward."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat_hidden, flat_labels = hidden.flatten(0, -2), labels.flatten()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_hidden.shape[0], chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_loss, flat_hidden[piece], weight, bias, flat_labels[piece],
                                   use_reentrant=False)
    return total


def _chunk_loss(hidden, weight, bias, labels):
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def _head_class():
    import torch.nn.functional as F
    from torch import nn

    class ChunkedLossHead(nn.Module):
        """lm_head, computing the summed token loss chunk by chunk while `labels` is set."""

        def __init__(self, head: nn.Linear, chunk: int):
            super().__init__()
            self.weight = head.weight
            self.bias = head.bias
            self.chunk = chunk
            self.labels = None

        def forward(self, hidden):
            if self.labels is None:
                return F.linear(hidden, self.weight, self.bias)
            return chunked_loss_sum(hidden, self.weight, self.labels, self.chunk, self.bias)

        @contextlib.contextmanager
        def loss_for(self, labels) -> Iterator[None]:
            """The model's forward returns the summed loss against `labels` (shifted already) as logits."""
            self.labels = labels
            try:
                yield
            finally:
                self.labels = None

    return ChunkedLossHead


def install(model, vocab: int, budget: int = CHUNK_BYTES):
    """Replace the model's output projection (get_output_embeddings) by a ChunkedLossHead; return it."""
    head = model.get_output_embeddings()
    chunked = _head_class()(head, chunk_tokens(vocab, budget))
    model.set_output_embeddings(chunked)
    return chunked
