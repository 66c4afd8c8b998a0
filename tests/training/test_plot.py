"""`clusterctl plot RUN`: a real PNG from sft/metrics.jsonl; replayed steps counted once; an RL run's
reward (per function), KL and preference panels, and their series in --json."""
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from clusterctl.commands.plot import command as plot_command


def test_plot_writes_png(tmp_path):
    run = tmp_path / "20260101-000000-abcd"
    (run / "sft").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    lines = [{"step": s, "max_steps": 4, "loss": 6.0 - s / 2, "lr": 1e-3 * s} for s in (1, 2, 3, 2, 3, 4)]
    (run / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
    result = CliRunner().invoke(plot_command, [str(run), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["steps"] == 4 and summary["last_loss"] == 4.0
    png = (run / "sft" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_plot_without_metrics_says_why(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "run.json").write_text("{}")
    result = CliRunner().invoke(plot_command, [str(run)])
    assert result.exit_code != 0 and "no training metrics yet" in str(result.exception)


GOLDEN = Path(__file__).parent / "golden"


def rl_run(tmp_path, kind: str) -> Path:
    """A run folder holding metrics.jsonl as a real 2-rank run of the tiny model wrote it (recorded with
    tests/rl/rl_run.py: GRPO with beta 0.04 and two toy rewards, 8 steps; DPO on 4 pairs, 6 steps)."""
    run = tmp_path / f"20260101-000000-{kind}"
    (run / kind).mkdir(parents=True)
    (run / "run.json").write_text("{}")
    shutil.copy(GOLDEN / f"{kind}-metrics.jsonl", run / kind / "metrics.jsonl")
    return run


def test_grpo_run_plots_rewards_per_function_beside_loss_and_kl(tmp_path):
    run = rl_run(tmp_path, "grpo")
    result = CliRunner().invoke(plot_command, [str(run), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["stage"] == "grpo" and summary["steps"] == 8
    assert summary["panels"] == {"loss": ["loss"], "learning rate": ["lr"], "KL": ["kl"],
                                 "reward": ["reward", "rewards/ids_divisible_by_4/mean", "rewards/no_token_7/mean"]}
    recorded = [json.loads(line) for line in (GOLDEN / "grpo-metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "rewards/ids_divisible_by_4/mean", "rewards/no_token_7/mean", "kl", "loss"):
        assert summary["series"][key] == {"steps": list(range(1, 9)), "values": [r[key] for r in recorded]}
    png = Path(summary["png"])
    assert png == run / "grpo" / "metrics.png" and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    text = CliRunner().invoke(plot_command, [str(run)]).output
    assert f"reward {recorded[0]['reward']:.4f} -> {recorded[-1]['reward']:.4f}" in text


def test_the_figure_has_a_reward_panel_with_one_line_per_reward(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: saved.append(fig) or Path(args[0]).write_bytes(b"png"))
    assert CliRunner().invoke(plot_command, [str(rl_run(tmp_path, "grpo"))]).exit_code == 0
    axes = saved[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "reward", "KL", "learning rate"]
    reward = axes[1]
    assert [line.get_label() for line in reward.get_lines()] == [
        "reward", "rewards/ids_divisible_by_4/mean", "rewards/no_token_7/mean"]
    recorded = [json.loads(line) for line in (GOLDEN / "grpo-metrics.jsonl").read_text().splitlines()]
    assert list(reward.get_lines()[0].get_ydata()) == [r["reward"] for r in recorded]


def test_dpo_run_plots_margins_and_accuracies(tmp_path):
    result = CliRunner().invoke(plot_command, [str(rl_run(tmp_path, "dpo")), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["panels"] == {"loss": ["loss"], "learning rate": ["lr"], "preference accuracy": ["rewards/accuracies"],
                                 "preference margin": ["rewards/margins", "rewards/chosen", "rewards/rejected"]}
    margins = summary["series"]["rewards/margins"]["values"]
    assert len(margins) == 6 and margins[-1] > margins[0]
