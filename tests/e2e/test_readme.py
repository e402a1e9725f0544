"""README's short tour, run as written: every command of its code block, in order, from a folder that holds a copy
of examples/ (so runs/, reports/ and merged/ land there), each one exiting 0."""

import json
import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO, run_cli

pytestmark = pytest.mark.slow


def tour() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## A short tour", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.strip()]


def test_the_tour_is_the_commands_this_test_runs() -> None:
    commands = tour()
    assert len(commands) >= 10 and all(line.startswith("tunelab ") for line in commands)


def test_readme_tour_runs_as_written(tmp_path: Path, tiny_model_dir) -> None:
    """Each line split as a POSIX shell splits it (quotes, comments, `> file`), and run as a new `tunelab` process
    (forked from one that imported the libraries: conftest's run_cli)."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    for line in tour():
        words = shlex.split(line, comments=True)
        assert words[0] == "tunelab", line
        args, into = (words[1:-2], words[-1]) if words[-2] == ">" else (words[1:], None)
        assert ">" not in args and "|" not in args, f"a shell construct the tour does not use: {line}"
        done = run_cli(*args, cwd=tmp_path, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        if into:
            (tmp_path / into).write_text(done.stdout)
        if "--json" in args:
            assert json.loads(done.stdout)["scope"]
    assert (tmp_path / "runs" / "quickstart" / "manifest.json").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert json.loads((tmp_path / "experiment.schema.json").read_text())["title"]
    assert list((tmp_path / "reports").glob("*/report.html"))
