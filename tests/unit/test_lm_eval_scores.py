"""lm-eval results as tunelab stores them; runs of another base refused before anything loads."""

from pathlib import Path

import pytest

from tests.conftest import fake_run
from tunelab.errors import TunelabError
from tunelab.lmeval import EvalSettings, directions_of, docs_of, evaluate_runs, scores_of


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


def test_each_documents_value_is_kept_for_the_scores_that_are_their_mean() -> None:
    """lm-eval's logged samples, as 0.4 logs them: the documents of a mean score (accuracy, a filtered exact match)
    are kept, in order, named by id and hash; a score aggregated over the whole corpus (perplexity) is not."""

    def sample(doc: int, filt: str = "none", **values) -> dict:
        return {"doc_id": doc, "doc_hash": f"h{doc}", "filter": filt, "metrics": list(values), **values}

    samples = {
        "arc_easy": [
            sample(0, acc=1.0, acc_norm=0.0),
            sample(1, acc=0.0, acc_norm=1.0),
            sample(2, acc=True, acc_norm=1),
        ],
        "gsm8k": [sample(0, "strict-match", exact_match=1.0), sample(1, "strict-match", exact_match=0.0)],
        "wikitext": [sample(0, word_perplexity=(-12.5, 4)), sample(1, word_perplexity=(-3.0, 2))],
        "lambada": [sample(0, perplexity=2.0), sample(1, perplexity=4.0)],  # exp of a mean: not the values' mean
    }
    scores = {
        "arc_easy/acc": 2 / 3, "arc_easy/acc_norm": 2 / 3, "gsm8k/exact_match,strict-match": 0.5,
        "wikitext/word_perplexity": 9.8, "lambada/perplexity": 2.83,
    }  # fmt: skip
    assert docs_of(samples, scores) == {
        "arc_easy/acc": [["0:h0", 1.0], ["1:h1", 0.0], ["2:h2", 1.0]],
        "arc_easy/acc_norm": [["0:h0", 0.0], ["1:h1", 1.0], ["2:h2", 1.0]],
        "gsm8k/exact_match,strict-match": [["0:h0", 1.0], ["1:h1", 0.0]],
    }
    higher = {
        "arc_easy": {"acc": True, "acc_norm": True},
        "gsm8k": {"exact_match": True},
        "lambada": {"perplexity": False},
    }
    assert directions_of(higher, scores) == {
        "arc_easy/acc": True, "arc_easy/acc_norm": True, "gsm8k/exact_match,strict-match": True,
        "lambada/perplexity": False,
    }  # fmt: skip
