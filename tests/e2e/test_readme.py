"""README's short tour, run as written: every command of its code block, in order, from a folder that holds a copy
of examples/ (so runs/, reports/ and merged/ land there), each one exiting 0."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow


def tour() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## A short tour", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def test_the_tour_is_the_commands_this_test_runs() -> None:
    commands = tour()
    assert len(commands) >= 10 and all(line.startswith("tunelab ") for line in commands)


def test_readme_tour_runs_as_written(tmp_path: Path, tiny_model_dir) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    shell = f'tunelab() {{ "{sys.executable}" -m tunelab "$@"; }}\n'
    for line in tour():
        done = subprocess.run(
            ["bash", "-c", shell + line], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=os.environ
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        if "--json" in line.split("#")[0]:
            assert json.loads(done.stdout)["scope"]
    assert (tmp_path / "runs" / "quickstart" / "manifest.json").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "experiment.schema.json").read_text())["title"]
    assert list((tmp_path / "reports").glob("*/report.html"))
