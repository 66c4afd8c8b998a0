"""Held-out evaluation for the SFT stage, the `select: best` checkpoint choice and the deploy gate.

- The eval set is `eval_data` (a file) or `eval_ratio` of `data`, held out deterministically from the
  seed (the same conversations on every rank, every requeue, every re-run).
- Eval loss (mean token cross-entropy over the assistant tokens, as in training) is measured at step 0
  (the baseline), every `eval_steps`, at every checkpoint under `select: best`, and at the end; it goes
  into metrics.jsonl (`eval_loss`), TensorBoard (eval/loss), the trackers and each checkpoint's marker.
- `select: best`: when training ends, `<output_dir>/latest` names the complete checkpoint with the
  lowest eval loss (what convert reads); pruning never removes it.
- The gate (`deploy.gate:`): `python -m clusterctl.training.evaluation gate --model DIR (--max-eval-loss X |
  --better-than-start)` judges the checkpoint a converted model folder came from (its marker's
  `source`, whose marker holds the eval loss; the step-0 baseline from that SFT stage's metrics.jsonl)
  and exits 3 with the figures when it does not pass. Every deploy node runs it before serving.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from clusterctl.atomic import atomic_write_text
from clusterctl.errors import ConfigError

SELECT = ("last", "best")
GATE_FAILED_EXIT_CODE = 3


@dataclass
class EvalGate:
    """`deploy.gate:` serve only a model whose held-out eval loss passes (needs sft.eval_data or eval_ratio)."""
    max_eval_loss: float = 0.0          # refuse a model whose eval loss is above this (0: no limit)
    better_than_start: bool = False     # refuse a model whose eval loss is not below the step-0 one

    @property
    def enabled(self) -> bool:
        return bool(self.max_eval_loss or self.better_than_start)

    def validate(self, at) -> None:
        if self.max_eval_loss < 0:
            raise ConfigError(f"must not be negative, got {self.max_eval_loss} (0 = no limit)",
                              where=at("max_eval_loss"))

    def check_job(self, sft, at) -> None:
        """A gate on a job whose SFT stage measures no eval loss could never pass: refuse it at submit."""
        if self.enabled and not evaluates(sft):
            raise ConfigError("the deploy gate judges the eval loss, but the job measures none",
                              where=at("gate"), fix="set sft.eval_ratio (e.g. 0.05) or sft.eval_data")


def check_eval_settings(cfg, at) -> None:
    """Job-spec checks of the eval fields (orchestrator side: no torch)."""
    if cfg.eval_data and cfg.eval_ratio:
        raise ConfigError("eval_data and eval_ratio both set", where=at("eval_ratio"),
                          fix="hold out a fraction of data (eval_ratio) or give an eval file (eval_data), not both")
    if not 0 <= cfg.eval_ratio < 1:
        raise ConfigError(f"must be in [0, 1), got {cfg.eval_ratio}", where=at("eval_ratio"),
                          fix="e.g. eval_ratio: 0.05 (5% of the conversations held out)")
    if cfg.eval_data and not (cfg.eval_data.startswith("builtin:") or Path(cfg.eval_data).is_absolute()):
        raise ConfigError(f"eval_data {cfg.eval_data!r} is not an absolute path", where=at("eval_data"),
                          fix="give the absolute path of the eval file, as the nodes see it")
    if cfg.eval_steps < 0:
        raise ConfigError(f"must not be negative, got {cfg.eval_steps}", where=at("eval_steps"))
    if cfg.select not in SELECT:
        raise ConfigError(f"unknown select {cfg.select!r}", where=at("select"), fix="use last or best")
    if cfg.select == "best" and not evaluates(cfg):
        raise ConfigError("select: best needs an eval set", where=at("select"),
                          fix="set eval_data or eval_ratio, or select: last")
    if cfg.eval_steps and not evaluates(cfg):
        raise ConfigError("eval_steps without an eval set", where=at("eval_steps"),
                          fix="set eval_data or eval_ratio")


def evaluates(cfg) -> bool:
    return bool(cfg.eval_data or cfg.eval_ratio)


def hold_out(count: int, ratio: float, seed: int) -> set[int]:
    """Indices of the held-out conversations: round(ratio x count), at least 1, never all."""
    size = min(count - 1, max(1, round(ratio * count)))
    return set(random.Random(f"clusterctl-eval-{seed}").sample(range(count), size)) if size > 0 else set()


def split(samples: list, cfg, load) -> tuple[list, list]:
    """(train, eval) samples; `load(path)` loads an eval file the way the training data is loaded."""
    if cfg.eval_data:
        return samples, load(cfg.eval_data)
    if not cfg.eval_ratio:
        return samples, []
    held = hold_out(len(samples), cfg.eval_ratio, cfg.seed)
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def due(cfg, step: int, max_steps: int) -> bool:
    """Whether eval loss is measured after optimizer step `step`."""
    if not evaluates(cfg):
        return False
    return (step == max_steps or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0)
            or (cfg.select == "best" and step % cfg.save_steps == 0))


def eval_loss(trainer) -> float:
    """Mean token loss over the eval set, on every rank (a collective: all ranks must call it). Every
    data-parallel rank runs the same number of forwards (ZeRO-3 gathers parameters per forward); a rank
    without rows left repeats row 0 and counts nothing."""
    import torch
    import torch.distributed as dist

    from clusterctl.training import ulysses
    from clusterctl.training.batching import collate
    from clusterctl.training.data import IGNORE

    samples, micro = trainer.eval_samples, trainer.cfg.micro_batch
    pad = trainer.tokenizer.pad_token_id
    pad = trainer.tokenizer.eos_token_id if pad is None else pad
    per_round = micro * trainer.dp_size
    totals = torch.zeros(2, dtype=torch.float64)
    engine = trainer.engine
    engine.eval()
    with torch.no_grad():
        for start in range(0, len(samples), per_round):
            first = start + trainer.dp_rank * micro
            mine = [[i] for i in range(first, min(first + micro, len(samples)))]
            batch = collate(samples, mine or [[0]], pad_id=pad, multiple=trainer.sp)
            tensors = [batch.input_ids, batch.position_ids, batch.labels]
            if trainer.sp > 1:
                tensors = [ulysses.shard(t, trainer.sp_rank, trainer.sp) for t in tensors]
            ids, pos, labels = (t.to(engine.device) for t in tensors)
            with trainer.loss_head.loss_for(labels):   # the summed token loss, chunked as in training (loss.py)
                loss_sum = engine(input_ids=ids, position_ids=pos).logits
            if mine:
                totals[0] += loss_sum.item()
                totals[1] += (labels != IGNORE).sum().item()
    engine.train()
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def best_tag(output_dir: Path) -> str | None:
    """The complete checkpoint whose marker holds the lowest eval loss (None when none has one)."""
    from clusterctl.training.checkpoint import MARKER, complete_tags

    scored = []
    for tag in complete_tags(output_dir):
        try:
            loss = json.loads((Path(output_dir) / tag / MARKER).read_text()).get("eval_loss")
        except (OSError, ValueError):
            continue
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            scored.append((loss, tag))
    return min(scored)[1] if scored else None


def point_latest_at_best(output_dir: Path) -> str | None:
    """`select: best`: make `latest` (what convert reads) name the best checkpoint; returns its tag."""
    tag = best_tag(output_dir)
    if tag:
        atomic_write_text(Path(output_dir) / "latest", tag)
    return tag


def eval_losses(metrics_file: Path) -> dict[int, float]:
    """{step: eval_loss} from metrics.jsonl (a resumed run's later line for a step wins)."""
    found: dict[int, float] = {}
    for line in Path(metrics_file).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("eval_loss"), (int, float)):
            found[record["step"]] = record["eval_loss"]
    return found


def model_sources(model_dir: Path) -> tuple[Path, Path]:
    """(metrics.jsonl, checkpoint tag folder) a converted model folder came from: the model marker's
    `source` is `<sft stage>/checkpoints/<tag>`; metrics.jsonl sits in `<sft stage>/` (CONTRACTS: run folder)."""
    from clusterctl.training.checkpoint import MARKER

    source = Path(json.loads((Path(model_dir) / MARKER).read_text())["source"])
    return source.parent.parent / "metrics.jsonl", source


def gate(metrics_file: Path, *, max_eval_loss: float | None, better_than_start: bool,
         checkpoint_dir: Path | None = None, tag_dir: Path | None = None) -> tuple[bool, str]:
    """(passes, the figures). The loss judged is the checkpoint's (tag_dir, or the one `latest` names
    in checkpoint_dir) when its marker records one, else the last eval loss measured."""
    from clusterctl.training.checkpoint import MARKER

    try:
        losses = eval_losses(metrics_file)
    except OSError as exc:
        return False, f"no eval loss to judge: cannot read {metrics_file}: {exc.strerror}"
    if not losses:
        return False, f"no eval loss in {metrics_file}: set sft.eval_data or sft.eval_ratio"
    step, loss = max(losses.items())
    try:
        if checkpoint_dir and not tag_dir:
            tag_dir = Path(checkpoint_dir) / (Path(checkpoint_dir) / "latest").read_text().strip()
        marker = json.loads((Path(tag_dir) / MARKER).read_text()) if tag_dir else {}
    except (OSError, ValueError):
        marker = {}
    if isinstance(marker.get("eval_loss"), (int, float)):
        step, loss = marker["step"], marker["eval_loss"]
    figures = f"eval_loss {loss:.4f} at step {step}"
    if max_eval_loss is not None and not loss <= max_eval_loss:
        return False, f"{figures} is above the gate's {max_eval_loss:g}"
    if better_than_start:
        if 0 not in losses:
            return False, f"{figures}, but no step-0 eval loss was recorded to compare with"
        if not loss < losses[0]:
            return False, f"{figures} is not better than {losses[0]:.4f} at step 0"
        figures += f" (step 0: {losses[0]:.4f})"
    return True, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.training.evaluation")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("gate", help="pass (exit 0) or refuse (exit 3) a trained model by its eval loss")
    source = check.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a converted model folder (judge the checkpoint it came from)")
    source.add_argument("--metrics", type=Path, help="an SFT stage's metrics.jsonl")
    check.add_argument("--checkpoints", type=Path, help="with --metrics: the SFT output_dir (judge `latest`)")
    check.add_argument("--max-eval-loss", type=float)
    check.add_argument("--better-than-start", action="store_true")
    args = parser.parse_args(argv)
    metrics, tag_dir = args.metrics, None
    if args.model:
        try:
            metrics, tag_dir = model_sources(args.model)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"eval gate: REFUSED: {args.model} does not name the checkpoint it was converted from "
                  f"({type(exc).__name__}: {exc}); the gate judges models converted by clusterctl",
                  file=sys.stderr, flush=True)
            return GATE_FAILED_EXIT_CODE
    ok, figures = gate(metrics, max_eval_loss=args.max_eval_loss, better_than_start=args.better_than_start,
                       checkpoint_dir=args.checkpoints, tag_dir=tag_dir)
    print(f"eval gate: {'passed' if ok else 'REFUSED'}: {figures}", file=sys.stdout if ok else sys.stderr,
          flush=True)
    return 0 if ok else GATE_FAILED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
