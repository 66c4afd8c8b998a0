"""The node side of `clusterctl doctor --bandwidth`: one process per node measures the links the
training collectives will use (torch.distributed: NCCL on GPUs, gloo on CPU).

    python -m clusterctl.training.bandwidth --rank R --world N --master HOST --port P [--size-mb S]

1. Join: rank 0 hosts a TCPStore; every rank checks in with its host name. Ranks that have not
   checked in after --join-timeout are named as missing and every rank stops (rather than hanging
   in a collective, the way a training job does).
2. All-reduce of S MiB over all nodes: bus bandwidth as nccl-tests defines it (algbw x 2(n-1)/n).
3. Pairs: in n-1 rounds (round robin) every pair of nodes exchanges S MiB both ways at once; one slow
   link or NIC shows as slow pairs for the one node they share.
Rank 0 prints one `CLUSTERCTL-BANDWIDTH {json}` line with every figure; every rank prints its own
line too (so a rank that fails says why). `clusterctl doctor` compares the nodes (cluster/bandwidth.py).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from datetime import timedelta

MARK = "CLUSTERCTL-BANDWIDTH "


def round_robin(world: int) -> list[list[tuple[int, int]]]:
    """n-1 rounds (n rounded up to even) of disjoint pairs covering every pair once (circle method)."""
    players: list[int | None] = list(range(world)) + ([None] if world % 2 else [])
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(players[i], players[-1 - i]) for i in range(half)]
        rounds.append([(min(a, b), max(a, b)) for a, b in pairs if a is not None and b is not None])
        players = [players[0], players[-1]] + players[1:-1]
    return rounds


def report(values: dict) -> None:
    print(MARK + json.dumps(values), flush=True)


def join(args) -> tuple[object, list[int]]:
    """The store every rank checked in to, and the ranks missing after the join timeout (rank 0 decides)."""
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=args.join_timeout + 30)
    store = TCPStore(args.master, args.port, None, args.rank == 0, timeout=timeout, wait_for_workers=False)
    store.set(f"joined/{args.rank}", socket.gethostname())
    if args.rank == 0:
        deadline = time.monotonic() + args.join_timeout
        while True:
            missing = [r for r in range(args.world) if not store.check([f"joined/{r}"])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        store.set("verdict", json.dumps(missing))
        if missing:       # keep the store up until the ranks that came have read the verdict
            deadline = time.monotonic() + 10
            while store.add("read", 0) < args.world - 1 - len(missing) and time.monotonic() < deadline:
                time.sleep(0.1)
    else:
        store.wait(["verdict"], timeout)
        store.add("read", 1)
    return store, json.loads(store.get("verdict"))


def measure(args, store) -> dict:
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and args.backend != "gloo"
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=args.op_timeout))
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    size = int(args.size_mb * 2**20)
    data, incoming = (torch.ones(size // 4, dtype=torch.float32, device=device) for _ in range(2))

    def timed(action) -> float:
        action()                                   # warm-up: connections, allocations
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            action()
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.iters

    dist.barrier()
    seconds = timed(lambda: dist.all_reduce(data))
    algbw = size / seconds
    result = {"backend": backend, "size": size, "iters": args.iters,
              "allreduce": {"seconds": seconds, "algbw": algbw, "busbw": algbw * 2 * (args.world - 1) / args.world}}

    mine = []
    for pairs in round_robin(args.world):
        dist.barrier()
        for a, b in pairs:
            if args.rank in (a, b):
                peer = b if args.rank == a else a

                def exchange(peer=peer):
                    for request in (dist.isend(data, peer), dist.irecv(incoming, peer)):
                        request.wait()
                seconds = timed(exchange)
                if args.rank == a:
                    mine.append({"a": a, "b": b, "seconds": seconds, "bandwidth": size / seconds})
    gathered: list = [None] * args.world
    dist.all_gather_object(gathered, {"host": socket.gethostname(), "pairs": mine})
    dist.barrier()
    dist.destroy_process_group()
    result["hosts"] = [g["host"] for g in gathered]
    result["pairs"] = [p for g in gathered for p in g["pairs"]]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.bandwidth", description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="rank 0's address (its TCPStore)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size-mb", type=float, default=64.0)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--join-timeout", type=float, default=60.0)
    parser.add_argument("--op-timeout", type=float, default=600.0)
    parser.add_argument("--backend", choices=("auto", "gloo"), default="auto")
    args = parser.parse_args(argv)
    try:
        store, missing = join(args)
    except Exception as exc:   # noqa: BLE001 - report why this node could not reach rank 0
        report({"rank": args.rank, "host": socket.gethostname(),
                "error": f"could not reach rank 0 at {args.master}:{args.port}: {type(exc).__name__}: {exc}"})
        return 1
    if missing:
        report({"rank": args.rank, "host": socket.gethostname(), "missing": missing})
        return 1
    result = measure(args, store)
    report({"rank": args.rank, "host": socket.gethostname(), **(result if args.rank == 0 else {"done": True})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
