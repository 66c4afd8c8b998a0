"""A node's part of a real torch.distributed (gloo) rendezvous, run by a node script in place of training.

Joins MASTER_ADDR:MASTER_PORT as rank NODE_RANK of NNODES, all-reduces its rank, and records what it
saw in $STATE_DIR/rendezvous-NNN.json for the test to compare across nodes."""
import datetime
import json
import os
import socket

import torch
import torch.distributed as dist

rank, world = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
total = torch.tensor([float(rank)])
dist.all_reduce(total)
dist.barrier()
dist.destroy_process_group()
seen = {"rank": rank, "world": world, "host": socket.gethostname(), "master_addr": os.environ["MASTER_ADDR"],
        "master_port": os.environ["MASTER_PORT"], "sum": total.item()}
with open(os.path.join(os.environ["STATE_DIR"], f"rendezvous-{rank:03d}.json"), "w") as f:
    json.dump(seen, f)
print("rendezvous ok", seen, flush=True)
