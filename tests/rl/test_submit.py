"""`clusterctl submit grpo|dpo|simpo`: the kind's own validated section, reward files checked at submit
(by file and line), copied into the run folder, and the chain grpo -> convert -> deploy rendered like SFT's."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from clusterctl.training.rl.config import RLConfig

REWARDS = textwrap.dedent('''
    def brevity(completions, **kwargs):
        return [1.0 / (1 + len(c)) for c in completions]

    def needs_answer(completions, answer, **kwargs):
        return [float(c.strip() == a) for c, a in zip(completions, answer)]
''')


def run_dir(result) -> Path:
    return Path(result.stdout.split(": ", 1)[1].split("\n", 1)[0].strip())


@pytest.fixture
def job(tmp_path):
    """A GRPO job spec beside its reward file and prompt data, as a user writes them."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                                                    for i in range(8)))

    def write(**grpo):
        body = {"rewards": ["rewards.py:brevity"], "num_generations": 4, "micro_batch": 4, **grpo}
        lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in body.items())
        (tmp_path / "grpo.yaml").write_text(f"name: mine\nkind: grpo\nmodel: builtin:tiny-deepseek-v3\n"
                                            f"data: prompts.jsonl\ngrpo:\n{lines}\n")
        return tmp_path / "grpo.yaml"
    return write


def test_builtin_countdown_job_renders_the_chain(clusterctl):
    run = run_dir(clusterctl("submit", "grpo", "--nodes", "2", "--dry-run"))
    data = json.loads((run / "run.json").read_text())
    assert data["chain"] == ["grpo", "convert", "deploy"]
    assert data["stages"]["grpo"]["nodes"] == 2 and data["stages"]["grpo"]["output"] == str(run / "grpo" / "checkpoints")
    for rank in (0, 1):
        script = (run / "grpo" / f"node-00{rank}.sh").read_text()
        assert f"export NODE_RANK={rank}" in script and "-m clusterctl.training.rl.grpo" in script
    config = RLConfig.load(run / "grpo" / "train.json")
    assert config.kind == "grpo" and config.data == "builtin:countdown"
    assert config.grpo.rewards == ["clusterctl.training.rl.countdown:format_reward",
                                   "clusterctl.training.rl.countdown:equation_reward"]
    assert config.output_dir == str(run / "grpo" / "checkpoints")
    assert f"--checkpoint {run / 'grpo' / 'checkpoints'}" in (run / "convert" / "node-000.sh").read_text()
    assert (run / "job.yaml").read_text().startswith("name: tiny-deepseek-v3-grpo")


def test_user_reward_file_is_checked_and_copied(clusterctl, job, tmp_path):
    run = run_dir(clusterctl("submit", "grpo", "--job", job(rewards=["rewards.py:brevity", "rewards.py:needs_answer"]),
                             "--dry-run"))
    config = RLConfig.load(run / "grpo" / "train.json")
    assert config.grpo.rewards == [f"{run / 'grpo' / 'rewards' / '00_rewards.py'}:brevity",
                                   f"{run / 'grpo' / 'rewards' / '01_rewards.py'}:needs_answer"]
    assert (run / "grpo" / "rewards" / "00_rewards.py").read_text() == REWARDS
    assert config.data == str(tmp_path / "prompts.jsonl")


@pytest.mark.parametrize("grpo, message", [
    ({"rewards": ["rewards.py:missing"]}, r"grpo.yaml:\d+: grpo.rewards\[0\]: .*rewards.py has no function 'missing'"),
    ({"rewards": ["nowhere.py:f"]}, r"grpo.yaml:\d+: grpo.rewards\[0\]: reward file .*nowhere.py does not exist"),
    ({"rewards": []}, r"grpo.yaml:\d+: grpo.rewards: GRPO needs at least one reward function"),
    ({"num_generations": 3}, r"grpo.num_generations: a generation batch of 4 completions"),
    ({"loss_type": "ppo"}, r"grpo.yaml:\d+: grpo.loss_type: unknown loss_type 'ppo'"),
    ({"rollout": {"engine": "trl-vllm"}}, r"grpo.rollout.engine: TRL's vLLM integration moves weights over NCCL"),
    ({"beta_typo": 0.1}, r"grpo.yaml:\d+: grpo.beta_typo: unknown key 'beta_typo'"),
    ({"lr": -1e-6}, r"grpo.yaml:\d+: grpo.lr: the learning rate must be above 0, got -1e-06"),
    ({"epochs": 0}, r"grpo.yaml:\d+: grpo.epochs: epochs must be above 0"),
    ({"grad_clip": -1}, r"grpo.yaml:\d+: grpo.grad_clip: must not be negative"),
])
def test_bad_grpo_jobs_are_refused_at_submit(clusterctl, job, grpo, message):
    import re
    result = clusterctl("submit", "grpo", "--job", job(**grpo), "--dry-run", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr


def test_a_reward_needing_a_missing_column_names_it(clusterctl, job, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "q"}\n{"prompt": "r"}\n')
    result = clusterctl("submit", "grpo", "--job", job(rewards=["rewards.py:needs_answer"]), "--dry-run", check=False)
    assert "needs answer, which the data set does not provide (columns: prompt)" in result.stderr


def test_bad_data_lines_are_named_at_submit(clusterctl, job, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "q"}\n{"question": "r"}\n')
    result = clusterctl("submit", "grpo", "--job", job(), "--dry-run", check=False)
    assert "prompts.jsonl: line 2: no 'prompt' field" in result.stderr
    assert "clusterctl data check" in result.stderr


def test_a_grpo_job_is_not_submitted_as_sft(clusterctl, job):
    result = clusterctl("submit", "sft", "--job", job(), "--dry-run", check=False)
    assert "is a grpo job" in result.stderr and "clusterctl submit grpo" in result.stderr


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_preference_kinds_render_on_their_example(clusterctl, kind):
    run = run_dir(clusterctl("submit", kind, "--nodes", "2", "--dry-run", "--stages", f"{kind},convert"))
    data = json.loads((run / "run.json").read_text())
    assert data["chain"] == [kind, "convert"]
    config = RLConfig.load(run / kind / "train.json")
    assert config.kind == kind and config.data == "builtin:tiny-dpo"
    assert config.preference.beta == {"dpo": 0.1, "simpo": 2.0}[kind]
    assert "-m clusterctl.training.rl.preference" in (run / kind / "node-001.sh").read_text()


def test_data_check_kind_dpo_reports_every_bad_line(clusterctl, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n{"prompt": "a", "chosen": "b"}\n'
                   '{"prompt": "a", "chosen": "b", "rejected": "b"}\n'
                   '{"prompt": "a", "chosen": [{"role": "robot", "content": "y"}], "rejected": "z"}\n')
    result = clusterctl("data", "check", bad, "--kind", "dpo", check=False)
    assert result.returncode == 1
    assert result.stdout.splitlines()[:4] == [
        f"{bad}: line 2: not JSON: Expecting value at column 1", f"{bad}: line 3: missing rejected",
        f"{bad}: line 4: chosen and rejected are identical (nothing to prefer)",
        f"{bad}: line 5: chosen[0] has role 'robot' (use one of: system, user, assistant)"]
    assert clusterctl("data", "check", "builtin:tiny-dpo", "--kind", "dpo").stdout.strip().endswith("OK")


def test_model_run_chains_from_an_earlier_runs_converted_model(clusterctl, job, tmp_path):
    from clusterctl.training.tiny import build_tiny_model

    sft = run_dir(clusterctl("submit", "sft", "--dry-run"))
    spec = job()
    spec.write_text(spec.read_text().replace("model: builtin:tiny-deepseek-v3", f"model: run:{sft.name}"))
    refused = clusterctl("submit", "grpo", "--job", spec, "--dry-run", check=False)
    assert f"grpo.yaml:3: model: run {sft.name} has no completed convert stage (its state: PENDING)" in refused.stderr
    assert f"clusterctl convert {sft.name}" in refused.stderr

    data = json.loads((sft / "run.json").read_text())
    data["stages"]["convert"]["state"] = "COMPLETED"
    (sft / "run.json").write_text(json.dumps(data))
    build_tiny_model(data["stages"]["convert"]["output"])       # the folder convert would have written
    run = run_dir(clusterctl("submit", "grpo", "--job", spec, "--dry-run"))
    assert RLConfig.load(run / "grpo" / "train.json").model == data["stages"]["convert"]["output"]


def test_vllm_server_rollouts_refuse_mla_on_cpu(clusterctl, job):
    result = clusterctl("submit", "grpo", "--job", job(rollout={"engine": "vllm-server"}), "--dry-run", check=False)
    assert "grpo.rollout.engine: vLLM's CPU build cannot reload MLA attention weights" in result.stderr


def test_trl_vllm_on_gpus_is_rendered_for_trl(clusterctl, job, tmp_path):
    """No GPU here: the GPU path is TRL's own vLLM integration, asserted as the GRPOConfig it gets."""
    from clusterctl.training.rl.grpo import grpo_arguments

    cluster = tmp_path / "gpu.yaml"
    cluster.write_text("backend: local\ngpus_per_node: 4\n")
    run = run_dir(clusterctl("submit", "grpo", "--job", job(rollout={"engine": "trl-vllm", "vllm_mode": "server",
                                                                     "port": 8123}),
                             "--cluster", cluster, "--dry-run"))
    config = RLConfig.load(run / "grpo" / "train.json")
    arguments = grpo_arguments(config)
    assert {k: arguments[k] for k in ("use_vllm", "vllm_mode", "vllm_server_host", "vllm_server_port")} == {
        "use_vllm": True, "vllm_mode": "server", "vllm_server_host": "127.0.0.1", "vllm_server_port": 8123}
    assert "export NPROC_PER_NODE=4" in (run / "grpo" / "node-000.sh").read_text()


def test_slurm_requeues_a_grpo_stage_like_sft(clusterctl, tmp_path):
    cluster = tmp_path / "slurm.yaml"
    cluster.write_text("backend: slurm\nslurm: {partition: cpu, signal_seconds: 300, max_restarts: 2}\n")
    run = run_dir(clusterctl("submit", "grpo", "--nodes", "2", "--cluster", cluster, "--dry-run"))
    batch = (run / "grpo" / "job.sbatch").read_text()
    assert "--signal=B:USR2@300" in batch and "scontrol requeue" in batch
    assert "trap 'pkill -USR2 -P \"$child\" || true' USR2" in (run / "grpo" / "node-000.sh").read_text()
