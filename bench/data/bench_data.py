"""Data loading benchmark: the data cache against Hugging Face `datasets` and against the loader before
the cache (every rank tokenizing the whole file into Python lists), on the same generated data.

    python bench/data/bench_data.py [--sizes 2000,20000,200000] [--tokens 2000] [--anchors-up-to 20000] [--work DIR]

Data: `--sizes` conversations of about `--tokens` tokens each (the tiny DeepSeek tokenizer), made by the
benchmark. Per size:
  build   cache build (datacache.ensure, one process per core) vs `datasets`: load_dataset("json") +
          .map(render, num_proc=cores) + save_to_disk, the same rendering (data.ChatFormat); seconds and
          tokens/s, and the ratio (> 1: the cache is faster).
  start   one rank, from its tokenizer loaded to its first collated batch ("data s"; the whole process
          start, imports of torch and transformers included, beside it), and the growth of its peak RSS
          (VmHWM) over its RSS once imports and tokenizer are loaded ("data MiB"; the whole peak beside it):
          with the cache built (what every rank does), vs the previous loader (git c24bf79's
          training/data.py, loaded from git, tokenizing in the rank).
Above --anchors-up-to conversations the two reference loaders are not run (the previous loader needs hours
and tens of GB per rank at 200k on 2 cores); the cache rows still are.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PREVIOUS_LOADER = "c24bf79:training/data.py"   # before the cache: every rank tokenizes the file into lists
WORDS = ["the", "sum", "of", "two", "numbers", "is", "found", "by", "adding", "them", "one", "digit", "at", "a", "time", "carrying", "tens", "when", "a", "column", "passes", "nine", "so", "the", "answer", "follows", "from", "the", "digits", "alone", "and", "we", "check", "it", "again"]

RANK = r"""
import json, sys, time
started = float(sys.argv[1])
from pathlib import Path
from transformers import AutoTokenizer
from clusterctl.training.batching import collate, epoch_steps, sample_lengths
tok = AutoTokenizer.from_pretrained(sys.argv[3])
ready = time.time()
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
baseline = status("VmRSS:")
if sys.argv[2] == "cache":                          # what every trainer rank calls
    import os
    from clusterctl.training import datacache
    os.environ[datacache.CACHE_DIR_ENV] = sys.argv[5]
    samples = datacache.training_samples(sys.argv[4], tok, 32768, sys.argv[5], rank=0)
else:
    import importlib.util
    spec = importlib.util.spec_from_file_location("previous_data", sys.argv[6])
    previous = sys.modules["previous_data"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(previous)
    samples = previous.load_dataset(sys.argv[4], tok, 32768)
steps = epoch_steps(sample_lengths(samples), epoch=0, seed=1, rows_per_step=2, max_length=32768, packing=False)
batch = collate(samples, steps[0], pad_id=0, multiple=1)
now = time.time()
print(json.dumps({"seconds": now - started, "data_seconds": now - ready, "rss_mib": status("VmHWM:"),
                  "data_rss_mib": status("VmHWM:") - baseline, "samples": len(samples)}))
"""

DATASETS_BUILD = r"""
import json, sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
from clusterctl.training.data import ChatFormat
tok = AutoTokenizer.from_pretrained(sys.argv[1])
fmt = ChatFormat(tok)
started = time.time()
def render(row):
    s = fmt.render("", row["messages"], 32768)
    return {"input_ids": s.input_ids, "labels": s.labels}
ds = load_dataset("json", data_files=sys.argv[2], split="train", cache_dir=sys.argv[3] + "/hf-cache")
ds = ds.map(render, num_proc=int(sys.argv[4]), remove_columns=ds.column_names)
ds.save_to_disk(sys.argv[3] + "/saved")
print(json.dumps({"seconds": time.time() - started, "rows": len(ds)}))
"""

CACHE_BUILD = r"""
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from clusterctl.training import datacache
tok = AutoTokenizer.from_pretrained(sys.argv[1])
started = time.time()
cache = datacache.ensure(Path(sys.argv[2]), tok, 32768, Path(sys.argv[3]), workers=int(sys.argv[4]),
                         log=lambda _: None)
print(json.dumps({"seconds": time.time() - started, "rows": len(cache), "tokens": int(cache.offsets[-1])}))
"""


def make_data(path: Path, n: int, tokens: int) -> None:
    """n conversations of about `tokens` tokens (a word is about 2.6 tiny-tokenizer tokens, measured)."""
    rng = random.Random(0)
    words = max(8, int(tokens / 2.6))
    with open(path, "w") as f:
        for i in range(n):
            text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"{i}: " + text(words // 8)},
                {"role": "assistant", "content": text(words // 8), "reasoning_content": text(words * 3 // 4)}]}) + "\n")


def run(script: str, *args) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=False,
                         env=env, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"benchmark step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--anchors-up-to", type=int, default=20000)
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    from clusterctl.training.tiny import build_tokenizer
    build_tokenizer().save_pretrained(work / "tokenizer")
    previous = work / "previous_data.py"
    previous.write_text(subprocess.run(["git", "show", PREVIOUS_LOADER], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = work / f"data-{n}.jsonl"
        make_data(data, n, args.tokens)
        cache_dir, hf_dir = work / f"cache-{n}", work / f"hf-{n}"
        built = run(CACHE_BUILD, work / "tokenizer", data, cache_dir, cores)
        anchored = n <= args.anchors_up_to
        anchor = run(DATASETS_BUILD, work / "tokenizer", data, hf_dir, cores) if anchored else None
        start_cache = run(RANK, time.time(), "cache", work / "tokenizer", data, cache_dir, previous)
        start_prev = run(RANK, time.time(), "previous", work / "tokenizer", data, cache_dir, previous) if anchored else None
        mib = data.stat().st_size / 2**20
        rows.append((n, mib, built["tokens"], built["seconds"], anchor and anchor["seconds"], start_cache, start_prev))
        shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"\n{cores} cores; conversations of about {args.tokens} tokens (tiny DeepSeek tokenizer)\n")
    print("| conversations | data MiB | tokens | cache build s | tokens/s | datasets map+save s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, mib, tokens, ours, theirs, _, _ in rows:
        anchor_cells = f"{theirs:.1f} | {theirs / ours:.2f}x" if theirs else "not run | -"
        print(f"| {n} | {mib:.0f} | {tokens / 1e6:.1f} M | {ours:.1f} | {tokens / ours / 1e6:.2f} M | {anchor_cells} |")
    print("\n| conversations | data s: cache (whole start) | previous loader (whole start) | ratio "
          "| data MiB: cache (whole peak) | previous (whole peak) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, *_, cache, prev in rows:
        ours = f"| {n} | {cache['data_seconds']:.2f} ({cache['seconds']:.1f}) |"
        mine = f"{cache['data_rss_mib']:.0f} ({cache['rss_mib']:.0f})"
        if prev is None:
            print(f"{ours} not run | - | {mine} | not run | - |")
            continue
        print(f"{ours} {prev['data_seconds']:.2f} ({prev['seconds']:.1f}) | "
              f"{prev['data_seconds'] / cache['data_seconds']:.0f}x | {mine} | {prev['data_rss_mib']:.0f} "
              f"({prev['rss_mib']:.0f}) | {prev['data_rss_mib'] / max(1, cache['data_rss_mib']):.0f}x |")


if __name__ == "__main__":
    main()
