"""A quiet terminal: in a pipe, tunelab's commands print their own lines only; the libraries' progress bars and logs
go to the run's train.log, and reach the terminal only with --verbose (which proves the switch hides them)."""

import re
from pathlib import Path

import pytest

from tests.conftest import DATA, EXAMPLES, run_cli

pytestmark = pytest.mark.slow
FOREIGN = ("%|", "it/s]", "[transformers]", "Loading weights", "WARNING", "Warning:")
# as on a user's machine: no switch of the libraries' set beforehand (another test's process may have set them)
UNSET = dict.fromkeys(["HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"])


def foreign(text: str) -> list[str]:
    return [marker for marker in FOREIGN if marker in text]


def test_train_and_compare_print_only_tunelabs_lines(tmp_path: Path, tiny_model_dir) -> None:
    exp = [str(EXAMPLES / "quickstart.yaml"), "--set", f"output.dir={tmp_path}", "--set", "train.max_steps=2"]
    quiet = run_cli("train", *exp, "--name", "quiet", env=UNSET, fresh=True)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stderr == "" and foreign(quiet.stdout) == []
    assert "quiet completed in" in quiet.stdout
    # tunelab's phases, in order, each with the time the one before took
    phases = [line for line in quiet.stdout.splitlines() if line.startswith("-> ")]
    assert [p.split(" (")[0] for p in phases] == [
        "-> loading builtin:tiny-chat on cpu",
        "-> preparing the sft trainer",
        "-> training",
        f"-> saving the adapter to {tmp_path / 'quiet'}",
    ]
    assert [p.rsplit("(", 1)[1].split(" took")[0] for p in phases[1:]] == ["loading", "preparing", "training"]
    assert "steps: 2 optimizer steps (train.max_steps; an epoch is 44); evaluated at each epoch's end" in quiet.stdout
    # in a pipe each logged step is a line (the first, then every 5th), its time to go in the units a person reads
    (step,) = [line for line in quiet.stdout.splitlines() if line.startswith("step ")]
    assert re.fullmatch(r"step 1/2  loss \d\.\d{4}  lr 3\.00e-03  \d+ tok/s  ETA \d+\.\d s", step), step
    log = (tmp_path / "quiet" / "train.log").read_text()
    assert "INFO transformers.trainer: ***** Running training *****" in log
    assert "INFO transformers.modeling_utils: loading weights file" in log

    loud = run_cli("--verbose", "train", *exp, "--name", "loud", env=UNSET, fresh=True)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stderr and "[transformers] loading weights file" in loud.stderr

    report = run_cli(
        "compare",
        str(tmp_path / "quiet"),
        "--prompts",
        str(DATA / "prompts.jsonl"),
        "--out",
        str(tmp_path / "rep"),
        env=UNSET,
        fresh=True,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stderr == "" and foreign(report.stdout) == []
    assert f"next: tunelab chat {tmp_path / 'quiet'}" in quiet.stdout
    talk = run_cli("chat", str(tmp_path / "quiet"), "--prompt", "hi", "--max-new-tokens", "8", env=UNSET, fresh=True)
    assert talk.returncode == 0, talk.stderr[-2000:]
    assert talk.stderr == "" and foreign(talk.stdout) == [] and talk.stdout.startswith("> hi\n")


def test_plan_and_study_plan_print_only_tunelabs_lines(tmp_path: Path) -> None:
    for args in (["plan", str(EXAMPLES / "quickstart.yaml")], ["study", "plan", str(EXAMPLES / "ladder.yaml")]):
        out = run_cli(*args, env=UNSET, fresh=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stderr == "" and foreign(out.stdout) == [], args
