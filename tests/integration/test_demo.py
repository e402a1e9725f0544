"""`make demo` as it is written, on the shipped data and the built-in model: its numbers must tell the story. SFT
answers the held-out questions in the format it taught (the base does not) at a fraction of the base's eval loss;
DPO moves held-out preference accuracy from near chance to near one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, REPO, run_cli
from tunelab.runs import read_manifest

pytestmark = pytest.mark.slow


def demo() -> list[str]:
    """The recipe of the Makefile's demo target, `$(BIN)/tunelab` being the installed command."""
    recipe = (REPO / "Makefile").read_text().split("\ndemo: install\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip().replace("$(BIN)/tunelab ", "tunelab ") for line in recipe.splitlines()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, tiny_model_dir) -> Path:
    here = tmp_path_factory.mktemp("demo")
    shutil.copytree(EXAMPLES, here / "examples")
    shell = f'tunelab() {{ "{sys.executable}" -m tunelab "$@"; }}\n'
    for i, line in enumerate(demo()):
        done = subprocess.run(
            ["bash", "-c", shell + line], cwd=here, capture_output=True, text=True, timeout=900, env=os.environ
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        (here / f"{i}.out").write_text(done.stdout)
    return here


def test_the_demo_trains_sft_then_compares_then_trains_dpo() -> None:
    assert [line.split()[:3] for line in demo()] == [
        ["tunelab", "train", "examples/quickstart.yaml"],
        ["tunelab", "compare", "runs/quickstart"],
        ["tunelab", "train", "examples/dpo.yaml"],
    ]


def test_sft_is_clearly_ahead_of_the_base(demo_dir: Path) -> None:
    report = json.loads((demo_dir / "reports" / "quickstart" / "report.json").read_text())
    numbers = {v["name"]: v["numbers"] for v in report["variants"]}
    assert report["settings"]["decoding"] == "greedy" and len(report["prompts"]) == 32
    assert numbers["base"]["expectation_pass_rate"] <= 0.2
    assert numbers["quickstart"]["expectation_pass_rate"] >= 0.8
    assert numbers["quickstart"]["eval_loss"] < 0.3 * numbers["base"]["eval_loss"]
    # the bundled prompts' reference answers: the run answers in the data's words, the base rambles
    assert numbers["quickstart"]["reference_f1"] >= 0.9 and numbers["base"]["reference_f1"] <= 0.5
    # and the rows tell the run apart from its base: each interval lies wholly on the base's worse side
    differences = report["differences"]
    for key, worse in (("eval_loss", 1), ("reference_f1", -1), ("expectation_pass_rate", -1)):
        assert differences[key]["reference"] == "quickstart" and differences[key]["best"] == ["quickstart"], key
        base = differences[key]["against"]["base"]
        assert worse * base["low"] > 0 and worse * base["high"] > 0, (key, base)
    printed = (demo_dir / "1.out").read_text()
    assert "expectations" in printed and "ref F1" in printed  # the columns the demo's table prints
    assert "Against the best: difference (95% interval)" in printed


def test_dpo_moves_preference_accuracy_from_chance_to_near_one(demo_dir: Path) -> None:
    manifest = read_manifest(demo_dir / "runs" / "dpo")
    assert manifest.preference_accuracy_before <= 0.7
    assert manifest.preference_accuracy_after >= 0.9
    printed = (demo_dir / "2.out").read_text()
    assert (
        f"preference accuracy {manifest.preference_accuracy_before:.3f} -> "
        f"{manifest.preference_accuracy_after:.3f} (held-out pairs)" in printed
    )


def test_a_preference_run_compares_alone(demo_dir: Path) -> None:
    """No SFT run among the runs: no eval loss (the preference eval set is pairs), prompts and accuracy still."""
    r = run_cli(
        "compare", str(demo_dir / "runs" / "dpo"), "--prompts", str(demo_dir / "examples" / "data" / "prompts.jsonl"),
        "--max-new-tokens", "4", "--no-base", "--out", str(demo_dir / "alone"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    numbers = json.loads((demo_dir / "alone" / "report.json").read_text())["variants"][0]["numbers"]
    assert numbers["eval_loss"] is None
    assert numbers["preference_accuracy"] == read_manifest(demo_dir / "runs" / "dpo").preference_accuracy_after
