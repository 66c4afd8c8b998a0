"""The streaming safetensors writer: readable by the library, hashed as written, nothing left on failure."""
import os

import pytest
import torch
from safetensors.torch import load_file

from clusterctl.convert.sfio import ShardWriter, file_record

TENSORS = {"a.weight": torch.randn(64, 32).to(torch.bfloat16), "b.bias": torch.arange(7, dtype=torch.int64),
           "c.weight": torch.randn(3, 5, 2)}


def entries(tensors):
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
            for name, t in tensors.items()]


def test_shard_reads_back_and_its_record_is_the_file_hash(tmp_path):
    path = str(tmp_path / "model-00001-of-00001.safetensors")
    writer = ShardWriter(path, entries(TENSORS), depth=1)
    for t in TENSORS.values():
        writer.add(t)
    record = writer.close()
    assert record == file_record(path) and not os.path.exists(path + ".tmp")
    loaded = load_file(path)
    assert loaded.keys() == TENSORS.keys()
    assert all(torch.equal(loaded[n], t) for n, t in TENSORS.items())


def test_a_tensor_unlike_the_header_is_refused_by_name(tmp_path):
    writer = ShardWriter(str(tmp_path / "s.safetensors"), entries(TENSORS))
    with pytest.raises(ValueError, match=r"a\.weight: got torch\.float32 \(64, 32\), header says bfloat16"):
        writer.add(torch.zeros(64, 32))
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_a_failed_write_surfaces_and_leaves_no_file(tmp_path):
    path = str(tmp_path / "s.safetensors")
    writer = ShardWriter(path, entries(TENSORS))
    writer.file.close()                      # the disk goes away under the writer thread
    with pytest.raises(ValueError, match="closed file"):
        for t in TENSORS.values():
            writer.add(t)
        writer.close()
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_a_shard_missing_tensors_is_not_finished(tmp_path):
    path = str(tmp_path / "s.safetensors")
    writer = ShardWriter(path, entries(TENSORS))
    writer.add(TENSORS["a.weight"])
    with pytest.raises(ValueError, match="2 tensors were never written"):
        writer.close()
    writer.abort()
    assert os.listdir(tmp_path) == []
