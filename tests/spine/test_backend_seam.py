"""The backend seam: what belongs to one scheduler stays in its backend."""
import re
from pathlib import Path

import clusterctl
from clusterctl.templates import __file__ as templates_init

TEMPLATES = Path(templates_init).parent
COMMANDS = Path(clusterctl.__file__).parent / "commands"


def test_the_generic_node_template_knows_no_scheduler():
    text = (TEMPLATES / "node.sh.j2").read_text()
    assert not re.search(r"scontrol|SLURM_|srun|sbatch|pdsh", text)


def test_no_command_switches_on_the_backend_s_name():
    for module in COMMANDS.glob("*.py"):
        assert not re.search(r"backend[\"'\]]*\s*(==|!=|in)\s*[\"'(\[]", module.read_text()), module.name
