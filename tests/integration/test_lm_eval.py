"""`tunelab eval`: lm-evaluation-harness on the base and on runs, with the bundled local tiny-world task; scores
stored in each run and shown by compare; bad tasks, folders and bases refused in one line."""

import json
from pathlib import Path

import pytest

from tests.conftest import DATA, EXAMPLES, run_cli
from tunelab.runs import other_checkpoints, read_lm_eval

pytestmark = pytest.mark.slow
TASK = ["--tasks", "tinyworld_answers", "--include-path", str(EXAMPLES / "eval"), "--chat-template"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, tiny_model_dir) -> Path:
    from tunelab.config import load_experiment
    from tunelab.train import train

    out = tmp_path_factory.mktemp("lm-eval")
    return train(load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={out}"])).run_dir


def test_eval_scores_the_base_and_the_run_and_stores_them(quickstart: Path, tmp_path: Path) -> None:
    done = run_cli("eval", str(quickstart), *TASK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Running generate_until" not in done.stdout + done.stderr  # lm-eval's own bars stay off the terminal
    record = read_lm_eval(quickstart)["tinyworld_answers"]
    run, base = record["scores"], record["base"]
    assert set(run) == set(base) == {"tinyworld_answers/exact_match", "tinyworld_answers/key_word"}
    # 40 held-out questions: a score is a count of them
    assert all(round(v * 40, 6).is_integer() for v in (*run.values(), *base.values()))
    # the tuned run answers with the fact more often than the base, which continues the question as prose
    assert run["tinyworld_answers/key_word"] > base["tinyworld_answers/key_word"]
    assert record["settings"]["chat_template"] is True and record["lm_eval_version"]
    row = next(line for line in done.stdout.splitlines() if line.strip().startswith("quickstart"))
    assert f"{run['tinyworld_answers/key_word']:.4f}" in row

    report = run_cli("compare", str(quickstart), "--prompts", str(DATA / "prompts.jsonl"), "--out", str(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    variants = {v["name"]: v["numbers"] for v in json.loads((tmp_path / "report.json").read_text())["variants"]}
    assert variants["quickstart"]["lm_eval:tinyworld_answers/key_word"] == run["tinyworld_answers/key_word"]
    assert variants["base"]["lm_eval:tinyworld_answers/key_word"] == base["tinyworld_answers/key_word"]
    assert "<th>tinyworld_answers/key_word</th>" in (tmp_path / "report.html").read_text()
    # each question's value is kept, for the run and the base alike, and compare pairs them question by question
    docs = record["docs"]["tinyworld_answers/key_word"]
    assert len(docs) == 40 == len({doc for doc, _ in docs}) and [d for d, _ in docs] == [
        d for d, _ in record["base_docs"]["tinyworld_answers/key_word"]
    ]
    assert sum(v for _, v in docs) / 40 == pytest.approx(run["tinyworld_answers/key_word"])
    assert record["higher_is_better"] == dict.fromkeys(run, True)
    made = json.loads((tmp_path / "report.json").read_text())
    key = "lm_eval:tinyworld_answers/key_word"
    assert made["best"][key] == ["quickstart"] and made["differences"][key]["rows"] == 40
    against = made["differences"][key]["against"]["base"]
    assert against["difference"] == pytest.approx(
        base["tinyworld_answers/key_word"] - run["tinyworld_answers/key_word"]
    )
    assert against["low"] <= against["difference"] <= against["high"] < 0


def test_a_second_task_joins_the_first_without_replacing_it(quickstart: Path) -> None:
    before = read_lm_eval(quickstart).get("tinyworld_answers")
    done = run_cli(
        "eval", str(quickstart), "--no-base", "--tasks", "tinyworld_choice", "--include-path", str(EXAMPLES / "eval")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_lm_eval(quickstart)
    assert record.get("tinyworld_answers") == before and record["tinyworld_choice"]["base"] is None
    assert 0.0 <= record["tinyworld_choice"]["scores"]["tinyworld_choice/acc"] <= 1.0


def test_a_checkpoint_is_evaluated_as_its_step_and_keeps_its_scores_in_itself(quickstart: Path, tmp_path: Path) -> None:
    """`tunelab eval RUN/checkpoints/checkpoint-N` scores that step as RUN@N (compare's view of it): its scores are
    kept in the checkpoint, the run's own lm_eval.json is not touched, and compare shows them for RUN@N."""
    checkpoint = other_checkpoints(quickstart)[0]
    assert checkpoint.name == "checkpoint-88"  # 3 epochs of 44 steps: the first is rotated out, the second stays
    run_before = (quickstart / "lm_eval.json").read_bytes() if (quickstart / "lm_eval.json").exists() else None
    choice = ["--tasks", "tinyworld_choice", "--include-path", str(EXAMPLES / "eval"), "--limit", "8"]
    done = run_cli("eval", str(checkpoint), "--no-base", *choice)
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_lm_eval(checkpoint)["tinyworld_choice"]
    score = record["scores"]["tinyworld_choice/acc"]
    assert (
        record["base"] is None and round(score * 8, 6).is_integer() and len(record["docs"]["tinyworld_choice/acc"]) == 8
    )
    row = next(line for line in done.stdout.splitlines() if line.strip().startswith("quickstart@88"))
    assert f"{score:.4f}" in row
    after = (quickstart / "lm_eval.json").read_bytes() if (quickstart / "lm_eval.json").exists() else None
    assert after == run_before

    report = run_cli(
        "compare", str(quickstart), "--checkpoints", "--prompts", str(DATA / "prompts.jsonl"), "--out", str(tmp_path)
    )
    assert report.returncode == 0, report.stderr[-3000:]
    variants = {v["name"]: v["numbers"] for v in json.loads((tmp_path / "report.json").read_text())["variants"]}
    assert variants["quickstart@88"]["lm_eval:tinyworld_choice/acc"] == score
    run_scores = read_lm_eval(quickstart).get("tinyworld_choice", {}).get("scores", {})
    assert variants["quickstart"].get("lm_eval:tinyworld_choice/acc") == run_scores.get("tinyworld_choice/acc")
    # pruning the run's checkpoints would take those scores with them: it says so
    pruned = run_cli("prune", str(quickstart), "--dry-run")
    assert pruned.returncode == 0 and pruned.stdout.startswith(f"{quickstart}: would remove 2 checkpoints, ")
    assert pruned.stdout.endswith(", and the lm-eval scores kept in checkpoint-88\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tasks", "tinyworld_answer", "--include-path", str(EXAMPLES / "eval")],
            f"error: --tasks: 'tinyworld_answer' is not an lm-eval task (nor in {EXAMPLES / 'eval'}); did you mean "
            "tinyworld_answers",
        ),
        (
            ["--tasks", "tinyworld_answers", "--include-path", "no/such/folder"],
            "error: --include-path: no/such/folder is not a folder",
        ),
        (["--tasks", " , "], "error: --tasks: give at least one lm-eval task name"),
    ],
)
def test_bad_tasks_are_one_line(quickstart: Path, args: list[str], message: str) -> None:
    before = (quickstart / "lm_eval.json").read_bytes() if (quickstart / "lm_eval.json").exists() else None
    done = run_cli("eval", str(quickstart), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(message) and done.stderr.strip().count("\n") == 0
    after = (quickstart / "lm_eval.json").read_bytes() if (quickstart / "lm_eval.json").exists() else None
    assert before == after


STUDY = """\
name: bench-mini
base: {base}
output: {out}
variants:
  qv:
    set: {{scope.lora.targets: qv, train.max_steps: 2}}
  qkvo:
    set: {{scope.lora.targets: qkvo, train.max_steps: 2, train.save_steps: 1}}
compare:
  prompts: {data}/prompts.jsonl
  max_new_tokens: 8
  checkpoints: true
eval:
  tasks: [tinyworld_choice]
  include_path: {tasks}
  limit: 8
"""


def test_a_study_runs_its_benchmarks_once_and_reports_them(tmp_path: Path, tiny_model_dir) -> None:
    from tunelab.study import load_study, run_study

    path = tmp_path / "bench.yaml"
    path.write_text(
        STUDY.format(base=EXAMPLES / "quickstart.yaml", out=tmp_path / "runs", data=DATA, tasks=EXAMPLES / "eval")
    )
    lines: list[str] = []
    outcomes, report = run_study(load_study(path), log=lines.append)
    assert [o.status for o in outcomes] == ["trained", "trained"] and report is not None
    # qkvo keeps a checkpoint at step 1 besides its result: compared beside it, and scored as it is
    assert "benchmarks (tinyworld_choice) on 3 run(s) or checkpoint(s)" in lines
    variants = {v["name"]: v["numbers"] for v in json.loads((report.parent / "report.json").read_text())["variants"]}
    qkvo = Path(next(o.run_dir for o in outcomes if o.name == "qkvo"))
    assert sorted(variants) == sorted(["base", *(Path(o.run_dir).name for o in outcomes), f"{qkvo.name}@1"])
    for numbers in variants.values():
        assert round(numbers["lm_eval:tinyworld_choice/acc"] * 8, 6).is_integer()  # 8 documents (limit)
    checkpoint = qkvo / "checkpoints" / "checkpoint-1"
    assert (
        variants[f"{qkvo.name}@1"]["lm_eval:tinyworld_choice/acc"]
        == (read_lm_eval(checkpoint)["tinyworld_choice"]["scores"]["tinyworld_choice/acc"])
    )
    stored = {o.name: (Path(o.run_dir) / "lm_eval.json").read_bytes() for o in outcomes}
    stored["qkvo@1"] = (checkpoint / "lm_eval.json").read_bytes()

    lines.clear()
    again, second = run_study(load_study(path), log=lines.append)
    assert [o.status for o in again] == ["skipped", "skipped"] and second == report
    assert not any(line.startswith("benchmarks") for line in lines)
    again_stored = {o.name: (Path(o.run_dir) / "lm_eval.json").read_bytes() for o in again}
    assert again_stored | {"qkvo@1": (checkpoint / "lm_eval.json").read_bytes()} == stored


BLOCKED = """
import sys
from importlib.abc import MetaPathFinder


class NoLmEval(MetaPathFinder):  # as if lm-evaluation-harness were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lm_eval":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoLmEval())
sys.argv = ["tunelab", *sys.argv[1:]]
from tunelab.cli import main

main()
"""


def test_eval_without_lm_eval_installed_names_the_extra(quickstart: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, "eval", str(quickstart), "--tasks", "arc_easy"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == (
        "error: tunelab eval needs lm-evaluation-harness (No module named 'lm_eval'); pip install 'tunelab[eval]'\n"
    )
