"""Stands in for the SFT trainer under preemption: waits for SIGUSR2, "checkpoints", exits non-zero.

Each start records $SLURM_RESTART_COUNT (started-<restart>-NNN); on USR2 it writes checkpoint-<restart>-NNN
and exits 75 as the trainer does."""
import os
import signal
import sys
import time

state, rank = os.environ["STATE_DIR"], int(os.environ["NODE_RANK"])
restart = os.environ.get("SLURM_RESTART_COUNT", "0")


def checkpoint(signum, frame):
    open(os.path.join(state, f"checkpoint-{restart}-{rank:03d}"), "w").close()
    print(f"USR2 on restart {restart}: checkpoint saved", flush=True)
    sys.exit(75)


signal.signal(signal.SIGUSR2, checkpoint)
open(os.path.join(state, f"started-{restart}-{rank:03d}"), "w").close()
time.sleep(300)
