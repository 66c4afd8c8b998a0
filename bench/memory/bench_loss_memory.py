"""Peak memory of the loss step with a large vocabulary: the full-logits loss the trainer used before
against the chunked loss it uses now (training/loss.py), each beside the planner's "logits+loss" term
(for the full loss, the term the planner had before: T x V x 10 bytes).

    python bench/memory/bench_loss_memory.py [--tokens 4096,8192] [--vocab 129280] [--hidden 1024]

Each case runs in a fresh process on CPU, in bf16 like the trainer: hidden states [1, T, hidden] and
the output projection [vocab, hidden] (requires grad), the summed token cross-entropy, backward. The
measured figure is the growth of the peak RSS (VmHWM) over the RSS once the inputs exist; it also holds
the projection's and hidden states' gradients (2 x (vocab + T) x hidden bytes), which the planner counts
elsewhere (its gradient and activation terms): the "expected" column adds them to the planner's term.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STEP = r"""
import json, sys, torch, torch.nn.functional as F
from clusterctl.training import loss
mode, tokens, vocab, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
torch.manual_seed(0)
h = (torch.randn(1, tokens, hidden) * 0.02).to(torch.bfloat16).requires_grad_()
w = torch.nn.Parameter((torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16))
labels = torch.randint(0, vocab, (1, tokens))
import gc; gc.collect()
base = status("VmRSS:")
if mode == "full":
    value = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), reduction="sum")
else:
    value = loss.chunked_loss_sum(h, w, labels, loss.chunk_tokens(vocab))
value.backward()
print(json.dumps({"peak_growth": status("VmHWM:") - base, "loss": value.item()}))
"""


def measure(mode: str, tokens: int, vocab: int, hidden: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, mode, str(tokens), str(vocab), str(hidden)], cwd=REPO,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from clusterctl.training.loss import BYTES_PER_LOGIT, chunk_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--vocab", type=int, default=129_280)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    gib = 2**30
    print(f"vocab {args.vocab}, hidden {args.hidden}, bf16 on CPU; chunk {chunk_tokens(args.vocab)} tokens\n")
    print("| tokens | loss | measured peak growth GiB | planner logits+loss GiB (full: before, T x V x 10) "
          "| expected (+ grads) GiB "
          "| measured / expected | loss value |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for mode in ("full", "chunked"):
            result = measure(mode, tokens, args.vocab, args.hidden)
            logits_tokens = tokens if mode == "full" else min(tokens, chunk_tokens(args.vocab))
            planned = logits_tokens * args.vocab * (10 if mode == "full" else BYTES_PER_LOGIT)
            expected = planned + 2 * (args.vocab + tokens) * args.hidden
            print(f"| {tokens} | {mode} | {result['peak_growth'] / gib:.2f} | {planned / gib:.2f} | "
                  f"{expected / gib:.2f} | {result['peak_growth'] / expected:.2f} | {result['loss']:.1f} |")


if __name__ == "__main__":
    main()
