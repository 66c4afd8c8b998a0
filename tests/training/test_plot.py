"""`clusterctl plot RUN`: a real PNG from sft/metrics.jsonl; replayed steps counted once."""
import json

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
