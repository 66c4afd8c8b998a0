"""GRPO on the nodes: TRL's GRPOTrainer with the user's reward functions, under the SFT launcher.

    torchrun ... -m clusterctl.training.rl.grpo --config grpo/train.json

Data: JSONL, one prompt per line (`prompt`: a string or a message list) plus any columns the rewards
read. Rollouts (grpo.rollout.engine): `transformers` generates inside the trainer; `vllm-server` samples
from a vLLM server on loopback that reloads the weights after every optimizer step (CPU-capable, see
training/rl/rollout.py); `trl-vllm` is TRL's own vLLM integration (GPU clusters).
"""
from __future__ import annotations

from clusterctl.training.rl import runner
from clusterctl.training.rl.config import RLConfig
from clusterctl.training.rl.rewards import load_guarded
from clusterctl.training.rl.timing import StepTimings, step_timer


def grpo_arguments(cfg: RLConfig) -> dict:
    """GRPOConfig's keyword arguments for this job (what the trl-vllm command-line test asserts)."""
    g = cfg.grpo
    values = dict(
        runner.training_arguments(cfg), num_generations=g.num_generations,
        max_completion_length=g.max_completion_length, temperature=g.temperature, top_p=g.top_p, beta=g.beta,
        epsilon=g.epsilon, loss_type=g.loss_type, num_iterations=g.num_iterations, scale_rewards=g.scale_rewards,
        reward_weights=g.reward_weights or None, log_completions=False, use_vllm=g.rollout.engine == "trl-vllm")
    if g.rollout.engine == "trl-vllm":
        values.update(vllm_mode=g.rollout.vllm_mode, vllm_gpu_memory_utilization=g.rollout.gpu_memory_utilization,
                      vllm_server_host="127.0.0.1", vllm_server_port=g.rollout.port,
                      vllm_server_timeout=g.rollout.timeout)
    return values


def load_prompts(path: str):
    """The prompt data set (datasets' JSON loader; every column reaches the rewards)."""
    from datasets import load_dataset

    from clusterctl.errors import UserError

    data = load_dataset("json", data_files=path, split="train")
    if "prompt" not in data.column_names:
        raise UserError(f"no 'prompt' column (columns: {', '.join(data.column_names)})", where=path,
                        fix="one JSON object per line with a prompt (string or message list)")
    return data


def build(cfg: RLConfig):
    from trl import GRPOConfig, GRPOTrainer

    from clusterctl.training.rl.data import resolve_data

    base = runner.prepare_model(cfg)
    args = GRPOConfig(**grpo_arguments(cfg))

    class Trainer(runner.ZeroCheckpoints, StepTimings, GRPOTrainer):
        pass

    rollout_func = None
    if cfg.grpo.rollout.engine == "vllm-server":
        from clusterctl.training.rl.rollout import VllmServerRollout
        rollout_func = VllmServerRollout(cfg, base)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = Trainer(model=runner.load_model(base, cfg), args=args, reward_funcs=load_guarded(cfg.grpo.rewards),
                      train_dataset=load_prompts(resolve_data(cfg.data, cfg.output_dir)), processing_class=tokenizer,
                      rollout_func=rollout_func)
    trainer.add_callback(step_timer(trainer))
    trainer.on_exit = [rollout_func.stop] if rollout_func else []
    return trainer


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(build, argv, "python -m clusterctl.training.rl.grpo")


if __name__ == "__main__":
    from clusterctl.training.sft import exit_now

    exit_now(main())
