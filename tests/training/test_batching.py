"""Batch order and collation: deterministic, resumable, length-grouped or packed, labels shifted."""
import itertools

from clusterctl.training.batching import collate, epoch_steps, sample_lengths, stream
from clusterctl.training.data import IGNORE, Sample


def samples(lengths):
    return [Sample(f"line {i}", list(range(100 * i, 100 * i + n)), [IGNORE] + list(range(100 * i + 1, 100 * i + n)), n)
            for i, n in enumerate(lengths)]


LENGTHS = [5, 9, 3, 12, 7, 4, 8, 6, 11, 2, 10, 3]


def test_same_order_for_same_seed_and_resume_skips_exactly():
    data = samples(LENGTHS)
    kwargs = dict(seed=7, rows_per_step=2, max_length=64, packing=False)
    first = list(itertools.islice(stream(sample_lengths(data), **kwargs), 20))
    assert first == list(itertools.islice(stream(sample_lengths(data), **kwargs), 20))
    assert first[5:20] == list(itertools.islice(stream(sample_lengths(data), skip=5, **kwargs), 15))
    assert first[:6] != first[6:12]                       # epoch 2 is reshuffled
    assert list(itertools.islice(stream(sample_lengths(data), **{**kwargs, "seed": 8}), 6)) != first[:6]


def test_every_sample_once_per_epoch_grouped_by_length():
    data = samples(LENGTHS)
    steps = epoch_steps(sample_lengths(data), epoch=0, seed=1, rows_per_step=2, max_length=64, packing=False)
    seen = sorted(i for step in steps for row in step for i in row)
    assert seen == list(range(len(LENGTHS)))
    for step in steps:                                    # sorted inside the window: neighbours in length
        a, b = (len(data[row[0]].input_ids) for row in step)
        assert a >= b


def test_packing_fills_rows_and_restarts_positions():
    data = samples(LENGTHS)
    steps = epoch_steps(sample_lengths(data), epoch=0, seed=1, rows_per_step=1, max_length=16, packing=True)
    rows = [row for step in steps for row in step]
    assert all(sum(len(data[i].input_ids) for i in row) <= 16 for row in rows)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
    packed = next(row for row in rows if len(row) > 1)
    batch = collate(data, [packed], pad_id=0, multiple=1)
    first = len(data[packed[0]].input_ids)
    assert batch.position_ids[0, first].item() == 0       # second sample starts again at position 0
    assert batch.labels[0, first - 1].item() == IGNORE     # no target across the sample boundary


def test_collate_shifts_labels_and_pads_to_a_multiple():
    data = samples([5, 3])
    batch = collate(data, [[0], [1]], pad_id=-1, multiple=4)
    assert batch.input_ids.shape == (2, 8) and batch.tokens == 8
    assert batch.labels[0].tolist() == [1, 2, 3, 4, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch.input_ids[1].tolist() == [100, 101, 102, -1, -1, -1, -1, -1]
    assert batch.position_ids[1].tolist() == list(range(8))
