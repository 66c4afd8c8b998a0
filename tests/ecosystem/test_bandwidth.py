"""The bandwidth test's parts that need no network namespaces: the pair schedule, the verdict rules, and
the local backend's run over loopback (the namespace runs with a throttled link are in
tests/backends/test_doctor.py)."""
import json
from itertools import combinations

import pytest

from clusterctl.bandwidth import analyse, table
from clusterctl.training.bandwidth import round_robin


@pytest.mark.parametrize("world", range(2, 9))
def test_round_robin_meets_every_pair_once_in_disjoint_rounds(world):
    rounds = round_robin(world)
    assert len(rounds) == world - 1 + world % 2
    for pairs in rounds:
        ranks = [rank for pair in pairs for rank in pair]
        assert len(ranks) == len(set(ranks))
    assert sorted(pair for pairs in rounds for pair in pairs) == list(combinations(range(world), 2))


def full_result(world: int, pair_bandwidth) -> dict:
    pairs = [{"a": a, "b": b, "seconds": 1.0, "bandwidth": pair_bandwidth(a, b)}
             for a, b in combinations(range(world), 2)]
    return {"rank": 0, "host": "h0", "backend": "gloo", "size": 2**20, "iters": 5,
            "allreduce": {"seconds": 1.0, "algbw": 1e6, "busbw": 1.5e6}, "hosts": [f"h{r}" for r in range(world)],
            "pairs": pairs}


def test_a_node_whose_best_pair_is_far_below_the_median_is_slow():
    slow = 2
    verdict = analyse([full_result(5, lambda a, b: 1e6 if slow in (a, b) else 1e9)], {}, [f"n{r}" for r in range(5)],
                      slow_below=0.5)
    assert [n["status"] for n in verdict["nodes"]] == ["ok", "ok", "SLOW", "ok", "ok"]
    assert verdict["nodes"][2]["detail"] == "0.1% of the median 1 GB/s" and not verdict["ok"]
    two = analyse([full_result(2, lambda a, b: 1e6)], {}, ["", ""])
    assert [n["node"] for n in two["nodes"]] == ["h0", "h1"] and two["ok"]     # names as the nodes report them
    assert "a third node is needed" in table(two)


def test_local_backend_runs_the_real_program_over_loopback(clusterctl):
    result = clusterctl("doctor", "--bandwidth", "--nodes", "3", "--size-mb", "1", "--slow-below", "0", "--json")
    verdict = json.loads(result.stdout)         # --slow-below 0: loopback timings on a busy machine vary
    assert verdict["ok"] and verdict["backend"] == "gloo" and verdict["size"] == 2**20
    assert [n["rank"] for n in verdict["nodes"]] == [0, 1, 2]
    assert all(n["bandwidth"] > 0 and n["status"] == "ok" for n in verdict["nodes"])
    refused = clusterctl("doctor", "--bandwidth", "--nodes", "1", check=False)
    assert refused.returncode == 2 and "needs at least 2 nodes" in refused.stderr
