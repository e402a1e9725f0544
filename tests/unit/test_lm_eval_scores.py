"""lm-eval results as tunelab stores them; runs of another base refused before anything loads."""

from pathlib import Path

import pytest

from tests.conftest import fake_run
from tunelab.errors import TunelabError
from tunelab.lmeval import EvalSettings, evaluate_runs, scores_of


def test_scores_keep_numbers_drop_stderr_and_the_default_filter() -> None:
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.625},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.02, "sample_len": 8},
    }
    assert scores_of(results) == {
        "arc_easy/acc": 0.5,
        "arc_easy/acc_norm": 0.625,
        "gsm8k/exact_match,strict-match": 0.25,
    }


def test_runs_of_different_bases_are_refused_before_loading(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "a", "f1"), fake_run(tmp_path, "b", "f2")]
    with pytest.raises(TunelabError, match=r"^eval: the runs do not share a base model \(a: m \(f1\), b: m \(f2\)\)"):
        evaluate_runs(runs, EvalSettings(tasks=["arc_easy"]))
