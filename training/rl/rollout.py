"""GRPO rollouts from a vLLM server that reloads the policy's weights from disk after every optimizer
step: the path that works where TRL's own vLLM integration cannot (vLLM's CPU build has no NCCL weight
transfer, and its repacked CPU linears have no weight_loader for colocated syncs).

Each node's first rank starts `vllm serve` on 127.0.0.1 only (`VLLM_SERVER_DEV_MODE=1` exposes
/collective_rpc, which runs any worker method: never on a public interface), its output in the node
log folder. After a step, every rank joins the ZeRO-3 gather, the node's first rank writes the weights
(per-expert names, as transformers saves them) and POSTs /collective_rpc reload_weights; completions
come from /v1/completions with token ids and sampled-token log-probabilities (TRL's rollout_func).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from clusterctl.deploy.vllm_args import CPU_SERVE_FLAGS
from clusterctl.errors import UserError
from clusterctl.training.rl.config import RLConfig

SERVED_NAME = "policy"


def serve_command(model: Path, port: int, max_model_len: int) -> list[str]:
    """The `vllm serve` line (printed in the node log, asserted by the tests)."""
    return [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", SERVED_NAME, "--logprobs-mode", "processed_logprobs",
            "--max-model-len", str(max_model_len), *CPU_SERVE_FLAGS, "--disable-log-stats"]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def _die_with_parent() -> None:
    """In the server's process, before exec: the kernel ends it when the rank dies (a rank killed hard
    cannot run its clean-up)."""
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)      # 1 = PR_SET_PDEATHSIG


def save_weights(model, folder: Path, *, write: bool = True) -> None:
    """The policy's full weights as safetensors under the names transformers saves (per-expert for MoE
    models, which vLLM loads). Every rank must call it (the ZeRO-3 gather is collective); `write` on one."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if write:
            state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)


class VllmServer:
    """One loopback vLLM server owned by this process (stopped with it)."""

    process: subprocess.Popen | None          # None: a client of the server another rank of the node started

    def __init__(self, model: Path, port: int, max_model_len: int, log_dir: Path, timeout: float):
        self.url = f"http://127.0.0.1:{port}"
        command = serve_command(model, port, max_model_len)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"rollout-vllm-{os.environ.get('GROUP_RANK', os.environ.get('RANK', '0'))}.log"
        print(f"[rollout] starting: {' '.join(command)} (log {self.log})", flush=True)
        env = {"VLLM_CPU_KVCACHE_SPACE": "1",     # GiB; unset, vLLM's CPU build claims 90% of the RAM
               **os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                     "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
            env.pop(name, None)                      # the server is not a rank of the training job
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        self._wait(timeout)

    @classmethod
    def attach(cls, port: int, timeout: float) -> VllmServer:
        """A client of the server the node's first rank starts, once it answers. One server per node:
        a second `vllm serve` on the same port starts too (SO_REUSEPORT), the kernel splits requests
        between them, and only the one that took the reload request samples from the new weights."""
        server = cls.__new__(cls)
        server.url, server.process = f"http://127.0.0.1:{port}", None
        server.log = Path(os.environ.get("LOG_DIR", ".")) / "rollout-vllm-<node>.log"
        server._wait(timeout)
        return server

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UserError(f"the rollout vLLM server exited with {self.process.returncode}", where=str(self.log),
                                fix="read its log; vLLM's CPU build serves head sizes 32/64/80/96/112/128 only")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise UserError(f"the rollout vLLM server did not answer within {timeout:.0f} s", where=str(self.log),
                        fix="raise grpo.rollout.timeout")

    def reload(self, weights: Path) -> float:
        started = time.time()
        post(self.url + "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights)}})
        return time.time() - started

    def complete(self, prompt_ids: list[list[int]], *, max_tokens: int, temperature: float, top_p: float,
                 seed: int | None = None) -> list[dict]:
        body = {"model": SERVED_NAME, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "logprobs": 0, "return_token_ids": True}
        if seed is not None:
            body["seed"] = seed
        choices = post(self.url + "/v1/completions", body)["choices"]
        return sorted(choices, key=lambda c: c["index"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


class VllmServerRollout:
    """TRL's rollout_func: one completion per prompt entry (the trainer's batch already holds each prompt
    num_generations times), from this node's server, after syncing it to the trainer's current step."""

    def __init__(self, cfg: RLConfig, base: Path):
        self.cfg, self.base = cfg, base
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.weights = Path(cfg.output_dir) / "rollout-weights" / f"node-{os.environ.get('GROUP_RANK', '0')}"
        self.server: VllmServer | None = None
        self.loaded_step = 0
        self.stats: dict[str, float] = {}

    def _start(self) -> VllmServer:
        if self.server is None and self.local_rank != 0:
            self.server = VllmServer.attach(self.cfg.grpo.rollout.port, self.cfg.grpo.rollout.timeout)
        if self.server is None:
            log_dir = Path(os.environ.get("LOG_DIR", Path(self.cfg.output_dir).parent))
            self.server = VllmServer(self.base, self.cfg.grpo.rollout.port, self.cfg.max_length +
                                     self.cfg.grpo.max_completion_length, log_dir, self.cfg.grpo.rollout.timeout)
            import atexit
            atexit.register(self.server.stop)
        return self.server

    def stop(self) -> None:
        """Stop this node's server (the entry point calls it: the ranks leave through os._exit)."""
        if self.server is not None:
            self.server.stop()

    def sync(self, trainer, server: VllmServer) -> None:
        """Every rank gathers the ZeRO-3 shards; the node's first rank saves and reloads its server."""
        import torch.distributed as dist

        started = time.time()
        save_weights(trainer.accelerator.unwrap_model(trainer.model_wrapped), self.weights,
                     write=self.local_rank == 0)
        dist.barrier()
        if self.local_rank == 0:
            self.stats["rollout/reload_s"] = server.reload(self.weights)
        dist.barrier()                   # no rank samples from the node's server before its reload
        self.stats["rollout/sync_s"] = time.time() - started
        self.loaded_step = trainer.state.global_step

    def __call__(self, prompts: list, trainer) -> dict:
        server = self._start()
        if trainer.state.global_step != self.loaded_step:
            self.sync(trainer, server)
        tokenizer = trainer.processing_class
        if prompts and isinstance(prompts[0], list):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
            prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        g = self.cfg.grpo
        started = time.time()
        choices = server.complete(prompt_ids, max_tokens=g.max_completion_length, temperature=g.temperature,
                                       top_p=g.top_p)
        elapsed = time.time() - started
        completion_ids = [c["token_ids"] for c in choices]
        logprobs = [[lp if lp is not None else 0.0 for lp in c["logprobs"]["token_logprobs"]] for c in choices]
        self.stats["rollout/tokens_per_s"] = sum(map(len, completion_ids)) / max(elapsed, 1e-9)
        for key, value in self.stats.items():
            trainer._metrics["train"][key].append(value)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}
