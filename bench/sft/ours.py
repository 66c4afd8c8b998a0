"""clusterctl's trainer as bench_sft.py runs it: `clusterctl.training.sft` plus a peak-RSS report per rank.
    torchrun --nproc_per_node 2 ours.py train.json OUT_DIR"""
import os
import sys

from peak_rss import write_peak_rss

from clusterctl.training.sft import exit_now, main

if __name__ == "__main__":
    code = main(["--config", sys.argv[1]])
    write_peak_rss(sys.argv[2], int(os.environ["RANK"]))
    exit_now(code)
