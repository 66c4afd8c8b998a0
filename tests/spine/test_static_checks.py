"""The linter and the type checker are part of the test run (configured in pyproject.toml): `ruff check` on
the whole repository, `mypy` on the clusterctl package. A failure shows their report."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# setup.cfg package_dir: the folders that make up the import package clusterctl
PACKAGE_DIRS = {"training": "training", "convert": "convert", "deploy": "deploy", "templates": "templates"}


def tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: install the test extra (pip install -e '.[test]')")
    return str(path)


def test_ruff_is_clean():
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def package_of_links(where: Path) -> Path:
    """<where>/clusterctl laid out as installed: cluster/'s entries plus the node-side folders, as links."""
    package = where / "clusterctl"
    package.mkdir()
    for entry in (ROOT / "cluster").iterdir():
        if entry.name != "__pycache__" and entry.name not in PACKAGE_DIRS:
            (package / entry.name).symlink_to(entry)
    for name, folder in PACKAGE_DIRS.items():
        (package / name).symlink_to(ROOT / folder)
    return package


def test_mypy_is_clean(tmp_path):
    package_of_links(tmp_path)
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    result = subprocess.run([tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir",
                             str(tmp_path / ".mypy_cache"), "--no-error-summary", "-p", "clusterctl"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    for name, folder in [(f"clusterctl/{n}/", f"{f}/") for n, f in PACKAGE_DIRS.items()] + [("clusterctl/", "cluster/")]:
        report = report.replace(name, folder)      # name the files as they are in the repository
    assert result.returncode == 0, report
