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
        if self.path is None or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, **values) -> dict:
        """One optimizer step (`eval_loss` too when it was measured at this step); returns the record."""
        record = self._append(values)
        print(f"step {record['step']}/{record['max_steps']}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
              f"grad_norm {record['grad_norm']:.4f}  tokens/s {record['tokens_per_s']:.0f}  "
              f"elapsed {record['elapsed']:.1f}s" + self._eval_text(record), flush=True)
        if self.writer:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])
        self._write_eval(record)
        return record

    def log_eval(self, *, step: int, max_steps: int, eval_loss: float) -> dict:
        """The eval loss before any training (step 0): the baseline a deploy gate can compare with."""
        record = self._append({"step": step, "max_steps": max_steps, "eval_loss": eval_loss})
        print(f"step {step}/{max_steps}" + self._eval_text(record), flush=True)
        self._write_eval(record)
        return record

    def _append(self, values: dict) -> dict:
        now = time.time()
        record = {**values, "elapsed": round(now - self.start, 3), "time": round(now, 3)}
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    @staticmethod
    def _eval_text(record: dict) -> str:
        return f"  eval_loss {record['eval_loss']:.4f}" if record.get("eval_loss") is not None else ""

    def _write_eval(self, record: dict) -> None:
        if self.writer:
            if record.get("eval_loss") is not None:
                self.writer.add_scalar("eval/loss", record["eval_loss"], record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
