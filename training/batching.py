"""The order samples are trained in: deterministic from (seed, epoch), so a resumed run replays it.

A *row* is one sequence of the micro-batch: one sample, or several packed ones. A *micro-step* is
dp_size * micro_batch rows; data-parallel rank d takes rows [d*micro_batch, (d+1)*micro_batch). Without
packing, rows are grouped by length (sorted inside shuffled windows, then the micro-steps shuffled) so
padding stays small. Packed rows restart position_ids at each sample, which transformers turns into a
block-diagonal causal mask: samples never attend to each other.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clusterctl.training.data import IGNORE, Sample

LENGTH_WINDOW = 16      # micro-steps sorted together when grouping by length


def sample_lengths(samples: Sequence) -> np.ndarray:
    """Every sample's token count: the cache's offsets where it has them (no object per sample: 200k
    CachedSamples cost seconds at every rank's start), else each sample's input_ids."""
    lengths = getattr(samples, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths(), dtype=np.int64)
    return np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))


def epoch_steps(lengths: np.ndarray, *, epoch: int, seed: int, rows_per_step: int, max_length: int,
                packing: bool) -> list[list[list[int]]]:
    """The epoch's micro-steps, each a list of rows, each a list of sample indices (`lengths`: what
    sample_lengths gives)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if packing:
        rows = _packed_rows(order.tolist(), lengths[order].tolist(), max_length)
        steps = [rows[i:i + rows_per_step] for i in range(0, len(rows) - rows_per_step + 1, rows_per_step)]
        return [steps[i] for i in rng.permutation(len(steps)).tolist()]
    # longest first inside each window of micro-steps (lexsort is stable: ties keep the shuffled order), one
    # sample per row; built as one array (nested lists from tolist(): 200k samples in milliseconds)
    window = np.arange(len(order)) // (rows_per_step * LENGTH_WINDOW)
    ordered = order[np.lexsort((-lengths[order], window))]
    count = len(ordered) // rows_per_step
    steps_array = ordered[:count * rows_per_step].reshape(count, rows_per_step, 1)
    return steps_array[rng.permutation(count)].tolist()


def _packed_rows(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """Samples in `order`, a row closed when the next one would pass max_length."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in zip(order, lengths):
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def stream(lengths: np.ndarray, *, seed: int, rows_per_step: int, max_length: int, packing: bool,
           skip: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
    """Micro-steps forever, epoch after epoch, as (epoch, rows); the first `skip` are passed over."""
    epoch = 0
    while True:
        steps = epoch_steps(lengths, epoch=epoch, seed=seed, rows_per_step=rows_per_step,
                            max_length=max_length, packing=packing)
        if not steps:
            raise ValueError("no micro-step fits")
        for rows in steps:
            if skip:
                skip -= 1
                continue
            yield epoch, rows
        epoch += 1


@dataclass
class Batch:
    input_ids: torch.Tensor      # [rows, length]
    position_ids: torch.Tensor
    labels: torch.Tensor         # already shifted: labels[:, t] is the target of position t
    tokens: int                  # real (non-pad) tokens


def collate(samples: list[Sample], rows: list[list[int]], *, pad_id: int, multiple: int) -> Batch:
    """Right-pad the rows to one length (a multiple of `multiple`, the sp size) and shift the labels."""
    ids, pos, labels = [], [], []
    for row in rows:
        ids.append([t for i in row for t in samples[i].input_ids])
        pos.append([p for i in row for p in range(len(samples[i].input_ids))])
        joined = [t for i in row for t in samples[i].labels]
        labels.append(joined[1:] + [IGNORE])
    longest = max(len(r) for r in ids)
    length = -(-longest // multiple) * multiple
    tokens = sum(len(r) for r in ids)
    for r_ids, r_pos, r_labels in zip(ids, pos, labels):
        pad = length - len(r_ids)
        r_pos.extend(range(r_pos[-1] + 1, r_pos[-1] + 1 + pad))
        r_ids.extend([pad_id] * pad)
        r_labels.extend([IGNORE] * pad)
    return Batch(torch.tensor(ids), torch.tensor(pos), torch.tensor(labels), tokens)
