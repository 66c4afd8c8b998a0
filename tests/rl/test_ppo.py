"""PPO (training/rl/ppo.py) for real on the tiny model: the reward rises on a learnable toy reward while
the KL against the frozen reference rises from 0, across a resume from the step-3 checkpoint (actor and
critic shards in SFT's layout); the `ppo:` section's refusals at submit; and `clusterctl submit ppo --nodes 2`
with no job file end to end: train -> convert -> vLLM serves -> health."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from rl_run import TOY_REWARD, check_builtin_end_to_end, read_metrics, run, write_config


def toy_ppo(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_rewards.py").write_text(TOY_REWARD)
    with open(folder / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"Question {i}: say something."}) + "\n" for i in range(64))
    ppo = {"rewards": [f"{folder / 'toy_rewards.py'}:ids_divisible_by_4"], "num_generations": 2,
           "max_completion_length": 8, "ppo_epochs": 4, "num_mini_batches": 2}
    return write_config(folder, **{"kind": "ppo", "data": str(folder / "prompts.jsonl"), "micro_batch": 16,
                                   "lr": 7e-3, "save_steps": 3, "zero_stage": 2, "ppo": ppo, **values})


def test_ppo_learns_the_toy_reward_and_drifts_from_the_reference_across_a_resume(tmp_path):
    run("ppo", toy_ppo(tmp_path, max_steps=3), nproc=1)
    checkpoints = tmp_path / "checkpoints"
    step3 = checkpoints / "step-3"
    marker = json.loads((step3 / "clusterctl-complete.json").read_text())
    assert marker["kind"] == "ppo" and marker["world_size"] == 1
    assert list(step3.glob("*optim_states.pt")) and list(step3.glob("*model_states.pt"))   # the actor: convert's input
    assert list((step3 / "critic").glob("*optim_states.pt")) and list((step3 / "critic").glob("*model_states.pt"))
    resumed = run("ppo", toy_ppo(tmp_path, max_steps=6), nproc=1)
    assert f"resuming from {step3} at step 3" in resumed.stdout
    assert (checkpoints / "latest").read_text().strip() == "step-6"
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    reward = [m["reward"] for m in metrics]
    kl = [m["kl"] for m in metrics]
    assert kl[0] == pytest.approx(0.0, abs=1e-4)          # the actor starts as the reference
    assert min(kl[-3:]) > 0.5, kl
    assert sum(reward[-3:]) / 3 > sum(reward[:2]) / 2 + 0.15, reward    # a random policy scores ~0.25
    assert all(0 <= m["policy/clipfrac"] <= 1 for m in metrics) and max(m["policy/clipfrac"] for m in metrics) > 0
    for key in ("loss", "value/loss", "policy/approx_kl", "advantages/mean", "advantages/std", "kl_coef",
                "rewards/ids_divisible_by_4/mean", "completions/mean_length", "tokens_per_s"):
        assert key in metrics[-1], key


def test_ppo_scores_with_a_reward_model_folder_and_a_value_model_folder(tmp_path, tiny_model):
    """A one-label sequence classifier scores the completions (no reward function: the scores are its
    logits, one per completion), and the critic's backbone comes from ppo.value_model."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 1
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    config = toy_ppo(tmp_path, model=str(tiny_model), max_steps=1, micro_batch=4)
    values = json.loads(config.read_text())
    values["ppo"] = {"reward_model": str(tmp_path / "rm"), "value_model": str(tmp_path / "rm"), "ppo_epochs": 1,
                     "max_completion_length": 4}
    config.write_text(json.dumps(values))
    run("ppo", config, nproc=1)
    [metrics] = read_metrics(tmp_path / "metrics.jsonl")
    assert metrics["reward"] != 0.0 and metrics["reward_std"] > 0      # without a scorer every reward would be 0
    assert not [key for key in metrics if key.startswith("rewards/")]
    assert (tmp_path / "checkpoints" / "step-1" / "critic").is_dir()


PROMPTS = "".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(8))


@pytest.fixture
def ppo_job(tmp_path):
    """A PPO job spec beside its reward file and prompts."""
    (tmp_path / "rewards.py").write_text(textwrap.dedent('''
        def brevity(completions, **kwargs):
            return [1.0 / (1 + len(c)) for c in completions]

        def needs_label(completions, label, **kwargs):
            return [0.0 for c in completions]
    '''))
    (tmp_path / "prompts.jsonl").write_text(PROMPTS)

    def write(**ppo):
        lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in ppo.items())
        (tmp_path / "ppo.yaml").write_text(f"name: mine\nkind: ppo\nmodel: builtin:tiny-deepseek-v3\n"
                                           f"data: prompts.jsonl\nppo:\n{lines}\n")
        return tmp_path / "ppo.yaml"
    return write


def test_a_user_reward_file_is_checked_copied_and_rendered(clusterctl, ppo_job):
    result = clusterctl("submit", "ppo", "--job", ppo_job(rewards=["rewards.py:brevity"], kl_coef=0.1), "--dry-run")
    run = Path(result.stdout.split(": ", 1)[1].split("\n", 1)[0].strip())
    from clusterctl.training.rl.config import RLConfig
    config = RLConfig.load(run / "ppo" / "train.json")
    assert config.kind == "ppo" and config.ppo.kl_coef == 0.1
    assert config.ppo.rewards == [f"{run / 'ppo' / 'rewards' / '00_rewards.py'}:brevity"]
    assert (run / "ppo" / "rewards" / "00_rewards.py").exists()
    assert "-m clusterctl.training.rl.ppo" in (run / "ppo" / "node-000.sh").read_text()
    assert json.loads((run / "run.json").read_text())["chain"] == ["ppo", "convert", "deploy"]


@pytest.mark.parametrize("ppo, message", [
    ({"rewards": ["rewards.py:brevity"], "kl_coeff": 0.1}, "kl_coeff"),
    ({}, "PPO needs a reward"),
    ({"rewards": ["rewards.py:nowhere"]}, "has no function 'nowhere'"),
    ({"rewards": ["missing.py:brevity"]}, "missing.py does not exist"),
    ({"rewards": ["rewards.py:needs_label"]}, "needs label, which the data set does not provide"),
    ({"reward_model": "no-such-folder"}, "is not a model folder"),
    ({"rewards": ["rewards.py:brevity"], "cliprange": 0}, "must be positive"),
    ({"rewards": ["rewards.py:brevity"], "lam": 1.5}, "between 0 and 1"),
    ({"rewards": ["rewards.py:brevity"], "micro_batch": 3, "num_mini_batches": 2}, "does not split"),
])
def test_bad_ppo_sections_are_refused_at_submit(clusterctl, ppo_job, ppo, message):
    result = clusterctl("submit", "ppo", "--job", ppo_job(**ppo), "--dry-run", check=False)
    assert result.returncode != 0 and "clusterctl: error:" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_reward_model_must_be_a_one_label_sequence_classifier(clusterctl, ppo_job, tiny_model):
    result = clusterctl("submit", "ppo", "--job", ppo_job(reward_model=str(tiny_model)), "--dry-run", check=False)
    assert result.returncode != 0 and "not a sequence classifier" in result.stderr, result.stderr


@pytest.mark.slow
def test_builtin_ppo_runs_end_to_end(clusterctl, tmp_path):
    check_builtin_end_to_end(clusterctl, tmp_path, "ppo", ("reward", "kl", "loss", "policy/clipfrac", "value/loss"))
