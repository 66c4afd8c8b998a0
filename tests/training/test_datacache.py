"""The data cache: built once by one process for many ranks, rebuilt when an input changes, never read
half-built; its samples and report are those of the in-memory loader."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clusterctl.training import data, datacache
from clusterctl.training.batching import collate, sample_lengths

RANK_SCRIPT = """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from clusterctl.training import datacache
datacache.CHUNK_BYTES = 4096                       # several chunks: the builder uses its worker pool
tok = AutoTokenizer.from_pretrained(sys.argv[1])
built = []
cache = datacache.ensure(Path(sys.argv[2]), tok, 256, Path(sys.argv[3]), workers=int(sys.argv[4]),
                         leader=sys.argv[5] == "0", log=built.append)
print(json.dumps({"built": any("tokenizing" in line for line in built), "folder": str(cache.folder),
                  "samples": len(cache), "sum": int(cache.arrays["tokens"].sum())}))
"""


def conversations(n: int, salt: str = "") -> list[str]:
    return [json.dumps([{"role": "user", "content": f"question {i}{salt}: what is {i} + {i}?"},
                        {"role": "assistant", "content": f"{2 * i}.", "reasoning_content": f"{i} and {i} make {2 * i}"}])
            for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def start_rank(tokenizer_dir, data_path, cache_dir, rank, workers=2):
    return subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tokenizer_dir), str(data_path), str(cache_dir),
                             str(workers), str(rank)], stdout=subprocess.PIPE, text=True)


def test_two_nodes_of_two_ranks_build_once_and_map_the_same_arrays(tmp_path, tokenizer_dir, tiny_tokenizer):
    """Four processes start together on one shared cache folder: one builds, three wait and map."""
    path = write(tmp_path / "train.jsonl", conversations(400))
    ranks = [start_rank(tokenizer_dir, path, tmp_path / "cache", rank) for rank in range(4)]
    results = [json.loads(p.communicate(timeout=300)[0].splitlines()[-1]) for p in ranks]
    assert all(p.returncode == 0 for p in ranks)
    assert sum(r["built"] for r in results) == 1
    assert len({(r["folder"], r["samples"], r["sum"]) for r in results}) == 1
    cache = datacache.TokenCache(Path(results[0]["folder"]))
    reference = data.load_dataset(str(path), tiny_tokenizer, 256)
    assert len(cache) == len(reference) == 400
    for mine, ref in zip(cache, reference):
        assert (mine.where, mine.input_ids.tolist(), mine.labels, mine.full_length) == (
            ref.where, ref.input_ids, ref.labels, ref.full_length)
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name not in (cache.folder.name, "hashes")]
    assert leftovers == []
    batch = collate(cache, [[0, 1], [2]], pad_id=0, multiple=2)          # what the trainer feeds the model
    assert sample_lengths(cache).tolist() == [len(s.input_ids) for s in reference]    # from the offsets
    assert batch.input_ids.shape[0] == 2 and batch.tokens == sum(len(cache[i].input_ids) for i in (0, 1, 2))


def test_changed_data_tokenizer_or_max_length_is_a_new_cache(tmp_path, tiny_tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    path = write(tmp_path / "train.jsonl", conversations(20))
    cache_dir = tmp_path / "cache"

    def ensure(tok, length):
        return datacache.ensure(path, tok, length, cache_dir, workers=1, log=lambda _: None)

    first = ensure(tiny_tokenizer, 256)
    assert ensure(tiny_tokenizer, 256).folder == first.folder
    write(path, conversations(20, salt="!"))                      # same file, new content
    changed = ensure(tiny_tokenizer, 256)
    assert changed.folder != first.folder
    assert changed.arrays["tokens"].tolist() != first.arrays["tokens"].tolist()
    shorter = ensure(tiny_tokenizer, 30)
    assert shorter.folder not in (first.folder, changed.folder)
    assert len(shorter) == 20 and max(shorter.lengths()) == 30 < max(changed.lengths())
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["question"])                                # a changed tokenizer
    retokenized = ensure(other, 256)
    assert retokenized.folder not in (first.folder, changed.folder, shorter.folder)
    assert len(retokenized.arrays["tokens"]) < len(changed.arrays["tokens"])


def test_a_killed_build_is_never_read_and_is_rebuilt(tmp_path, tokenizer_dir, tiny_tokenizer):
    path = write(tmp_path / "train.jsonl", conversations(6000))
    cache_dir = tmp_path / "cache"
    builder = start_rank(tokenizer_dir, path, cache_dir, 0, workers=1)
    deadline = time.time() + 120
    while not list(cache_dir.glob("*.building/owner.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    (claim,) = cache_dir.glob("*.building")
    assert not (claim / datacache.MARKER).exists()
    assert [p for p in cache_dir.iterdir() if datacache.is_complete(p)] == []
    messages: list[str] = []
    cache = datacache.ensure(path, tiny_tokenizer, 256, cache_dir, workers=1, log=messages.append)
    assert any("its builder process is gone" in m for m in messages)
    assert cache.folder.name == claim.name.removesuffix(".building") and len(cache) == 6000
    assert not claim.exists()


def test_a_builder_on_another_node_that_stops_beating_is_replaced(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "train.jsonl", conversations(10))
    cache_dir = tmp_path / "cache"
    fmt = datacache.choose_format(tiny_tokenizer)
    key, _ = datacache.cache_key(datacache.file_sha256(path, cache_dir), tiny_tokenizer, fmt, 256)
    claim = cache_dir / f"{key}.building"
    claim.mkdir(parents=True)
    (claim / "owner.json").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "time": 0}))
    (claim / "tokens.i32").write_bytes(b"\0" * 12)               # half-written
    messages: list[str] = []
    started = time.monotonic()
    cache = datacache.ensure(path, tiny_tokenizer, 256, cache_dir, workers=1, stale_after=1.0, poll=0.1,
                             log=messages.append)
    assert 1.0 <= time.monotonic() - started < 30
    assert any("no heartbeat for 1 s" in m for m in messages) and len(cache) == 10


def test_report_and_errors_are_the_check_commands(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(datacache.gc, "freeze", lambda: None)     # a trainer's call; not this test process's heap
    lines = conversations(3) + ["not json", '[{"role": "user", "content": "a"}]']
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(data.UserError) as err:
        datacache.training_samples(str(path), tiny_tokenizer, 256, tmp_path / "run" / "sft" / "checkpoints", 0)
    assert "line 4: not JSON" in str(err.value) and "line 5: the conversation ends" in str(err.value)
    cached = datacache.TokenCache(next(p for p in (tmp_path / "data-cache").iterdir() if datacache.is_complete(p)))
    assert cached.report == data.check_dataset(path, tiny_tokenizer, 256)
    assert cached.report["format"].startswith("deepseek")


def test_the_trainer_cache_lives_beside_the_runs_unless_configured(tmp_path, monkeypatch):
    monkeypatch.delenv(datacache.CACHE_DIR_ENV, raising=False)
    assert datacache.cache_dir_for(tmp_path / "runs" / "r1" / "sft" / "checkpoints") == tmp_path / "runs" / "data-cache"
    assert datacache.cache_dir_for(tmp_path / "out") == tmp_path / "data-cache"
    monkeypatch.setenv(datacache.CACHE_DIR_ENV, str(tmp_path / "fast"))
    assert datacache.cache_dir_for(tmp_path / "out") == tmp_path / "fast"


def test_empty_arrays_map(tmp_path, tiny_tokenizer):
    """A data set whose every line is bad still yields a complete cache whose report names them."""
    path = write(tmp_path / "bad.jsonl", ["nope"])
    cache = datacache.ensure(path, tiny_tokenizer, 256, tmp_path / "c", workers=1, log=lambda _: None)
    assert len(cache) == 0 and cache.report["errors"][0]["where"] == "line 1"
    assert isinstance(cache.lengths(), np.ndarray)
    assert datacache.cache_dir_for(tmp_path / "out", str(tmp_path / "job")) == tmp_path / "job"   # sft.data_cache_dir wins


def test_a_relative_data_cache_dir_is_refused_by_field(tmp_path):
    from clusterctl.errors import ConfigError
    from clusterctl.training.config import TrainConfig
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"data_cache_dir": "cache"}, where="job.yaml", prefix="sft.")
    assert "sft.data_cache_dir" in str(err.value) and "absolute" in str(err.value)
    assert TrainConfig.from_dict({"data_cache_dir": str(tmp_path)}).data_cache_dir == str(tmp_path)
