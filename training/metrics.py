"""Per-step training metrics (rank 0): a JSON line in metrics_file (what `clusterctl status` and
`clusterctl plot` read), a human line on stdout, and TensorBoard scalars."""
from __future__ import annotations

import json
import time
from pathlib import Path

from clusterctl.atomic import atomic_write_text


class Metrics:
    def __init__(self, metrics_file: str, tensorboard_dir: str, *, resume_step: int):
        self.path = Path(metrics_file) if metrics_file else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_after(resume_step)
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1)
        self.start = time.time()

    def _drop_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: forget the lines it will write again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, **values) -> None:
        now = time.time()
        record = {**values, "elapsed": round(now - self.start, 3), "time": round(now, 3)}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        print(f"step {record['step']}/{record['max_steps']}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
              f"grad_norm {record['grad_norm']:.4f}  tokens/s {record['tokens_per_s']:.0f}  "
              f"elapsed {record['elapsed']:.1f}s", flush=True)
        if self.writer:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
