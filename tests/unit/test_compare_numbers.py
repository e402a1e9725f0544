"""compare's numbers measured prompt by prompt and row by row: replies against their reference answers, and how far
each variant is from the best, by a paired bootstrap over the rows every variant is measured on
(Comparison.differences), and how the report shows it."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.compare import (
    Check,
    Comparison,
    Prompt,
    Variant,
    final_answer,
    paired_differences,
    ratio,
    read_prompts,
    reference_scores,
)
from tunelab.errors import TunelabError
from tunelab.report.html import difference_rows, render_markdown


@pytest.mark.parametrize(
    ("reply", "reference", "f1", "exact"),
    [
        ("The capital of Nuri is Kavelo.", "the capital of nuri is kavelo", 1.0, 1.0),  # case, full stop
        ("A capital: «Kavelo»!", "The capital — Kavelo", 1.0, 1.0),  # articles, Unicode punctuation
        ("Kavelo.", "The capital of Nuri is Kavelo.", 2 * 1 * 0.2 / 1.2, 0.0),  # precision 1, recall 1/5
        ("Kavelo Kavelo Kavelo", "Kavelo is it", 2 * (1 / 3) * (1 / 3) / (2 / 3), 0.0),  # a repeat counts once
        ("It is Zinvasbel.", "The capital of Nuri is Kavelo.", 2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5), 0.0),
        ("Nothing alike", "Kavelo", 0.0, 0.0),
        ("", "", 1.0, 1.0),
        ("...", "Kavelo", 0.0, 0.0),
        ("卡韦洛是首都。", "首都是卡韦洛", 1.0, 0.0),  # Chinese: a word a character (the same six, in another order)
        ("首都是北京", "首都是卡韦洛", 2 * 3 / 11, 0.0),  # 3 of 5 and 3 of 6 characters shared
        ("カベロです", "カベロ", 2 * 3 / 8, 0.0),  # kana alike
        ("수도는 카벨로", "수도는 카벨로입니다", 0.5, 0.0),  # Korean is written with spaces: its words stay whole
    ],
)
def test_a_reply_is_scored_against_its_reference_as_squad_scores_an_answer(
    reply: str, reference: str, f1: float, exact: float
) -> None:
    """SQuAD's official scoring: words lower-cased, punctuation and the articles a, an, the dropped; exact match of
    the words, and the F1 of the words they share."""
    assert reference_scores(reply, reference) == pytest.approx({"reference_f1": f1, "exact_match": exact})


def test_a_reply_that_called_tools_is_scored_by_what_it_said_after_them() -> None:
    call = {"type": "function", "function": {"name": "capital", "arguments": {"country": "Nuri"}}}
    reply = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Kavelo"},
        {"role": "assistant", "content": "The capital of Nuri is Kavelo."},
    ]
    assert final_answer(reply) == "The capital of Nuri is Kavelo." and final_answer("Kavelo.") == "Kavelo."
    assert final_answer(reply[:2]) == ""  # it never answered after the call


def test_a_prompt_files_reference_answer_is_read_and_a_reference_that_is_not_text_is_refused(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "reference": "The answer."}\n{"prompt": "b"}\n')
    assert [p.reference for p in read_prompts(path)] == ["The answer.", None]
    path.write_text('{"prompt": "a", "reference": ["x"]}\n')
    with pytest.raises(TunelabError, match=r"^.*p.jsonl:1: 'reference' must be a string, the answer the reply is"):
        read_prompts(path)


def token_rows(per_token: np.ndarray, tokens: np.ndarray) -> list[tuple[float, float]]:
    """Held-out rows as compare measures them: (summed loss, tokens)."""
    return [(float(x * n), float(n)) for x, n in zip(per_token, tokens, strict=True)]


def test_a_variant_better_on_every_token_by_the_same_amount_differs_by_exactly_that() -> None:
    rng = np.random.default_rng(0)
    tokens, loss = rng.integers(3, 50, 40), rng.gamma(2.0, 1.0, 40)
    measured = {"best": token_rows(loss, tokens), "worse": token_rows(loss + 0.25, tokens)}
    measured["same"] = list(measured["best"])
    got = paired_differences(measured, "best")
    assert got["worse"] == pytest.approx({"difference": 0.25, "low": 0.25, "high": 0.25}, abs=1e-12)
    assert got["same"] == {"difference": 0.0, "low": 0.0, "high": 0.0}
    assert "best" not in got


def test_the_difference_is_of_token_weighted_means_as_the_table_shows_them() -> None:
    """A long row weighs by its tokens (the eval loss is a mean over tokens, not over rows)."""
    measured = {"a": [(10.0, 10.0), (1.0, 1.0)], "b": [(5.0, 10.0), (3.0, 1.0)]}
    got = paired_differences(measured, "a")["b"]
    assert got["difference"] == pytest.approx(ratio(measured["b"]) - ratio(measured["a"])) == pytest.approx(8 / 11 - 1)
    assert ratio([(0.0, 0.0)]) is None


def test_a_difference_that_goes_both_ways_row_by_row_is_not_told_apart_and_a_steady_one_is() -> None:
    rng = np.random.default_rng(1)
    tokens, loss = rng.integers(3, 50, 60), rng.gamma(2.0, 1.0, 60)
    swing = np.where(np.arange(60) % 2 == 0, 0.5, -0.5)
    measured = {
        "a": token_rows(loss, tokens),
        "mixed": token_rows(loss + swing, tokens),
        "steady": token_rows(loss + 0.1 + rng.normal(0, 0.05, 60), tokens),
    }
    got = paired_differences(measured, "a")
    assert got["mixed"]["low"] < 0 < got["mixed"]["high"]
    assert 0 < got["steady"]["low"] < got["steady"]["difference"] < got["steady"]["high"]


def test_the_interval_holds_the_true_difference_about_95_times_in_100() -> None:
    """300 simulated held-out sets whose variants differ by 0.1 a token on average, with row-by-row noise shared by
    both (a row hard for one is hard for the other): the interval holds 0.1 in about 95% of them. An interval of
    the 5th to 95th percentiles holds it about 90% of the time; one that resampled each variant on its own draws,
    losing the pairing, almost always."""
    rng, held = np.random.default_rng(2), 0
    for k in range(300):
        tokens, loss = rng.integers(5, 40, 60), rng.gamma(2.0, 1.0, 60)
        measured = {"a": token_rows(loss, tokens), "b": token_rows(loss + 0.1 + rng.normal(0, 0.5, 60), tokens)}
        got = paired_differences(measured, "a", seed=k)["b"]
        held += got["low"] <= 0.1 <= got["high"]
    assert 0.915 <= held / 300 <= 0.985


def test_the_interval_ends_are_the_2_5th_and_97_5th_percentiles_of_the_resampled_difference() -> None:
    """Half of 100 pairs won by one variant only: a resampled difference is Binomial(100, 0.5) / 100, whose 2.5th and
    97.5th percentiles are 0.40 and 0.60 (the 5th and 95th, 0.42 and 0.58)."""
    measured = {"a": [(0.0, 1.0)] * 100, "b": [(1.0, 1.0)] * 50 + [(0.0, 1.0)] * 50}
    got = paired_differences(measured, "a")["b"]
    assert got["difference"] == 0.5
    assert 0.39 <= got["low"] <= 0.41 and 0.59 <= got["high"] <= 0.61


def test_the_same_rows_give_the_same_interval_each_time() -> None:
    rng = np.random.default_rng(3)
    measured = {
        "a": [(float(x), 1.0) for x in rng.normal(0, 1, 30)],
        "b": [(float(x), 1.0) for x in rng.normal(0, 1, 30)],
    }
    assert paired_differences(measured, "a") == paired_differences(measured, "a")
    assert paired_differences(measured, "a") != paired_differences(measured, "a", seed=1)


def comparison() -> Comparison:
    """Three variants measured on four held-out chats and two prompts; 'run' trained on the held-out chats."""
    p = [Prompt(i, [{"role": "user", "content": f"q{i}"}], contains=["x"]) for i in range(2)]
    p.append(Prompt(2, [{"role": "user", "content": "q2"}]))  # no expectations: not counted among their prompts
    losses = {"base": [2.0, 2.2, 1.8, 2.1], "run": [0.5, 0.6, 0.4, 0.5], "other": [1.0, 1.3, 0.9, 1.1]}
    passed = {"base": [0, 0, None], "run": [1, 1, None], "other": [1, 0, None]}
    variants = []
    per_row: dict = {}
    for name in losses:
        rows = [(x * 10, 10.0) for x in losses[name]]
        by_prompt = [(float(k or 0), float(k is not None)) for k in passed[name]]
        per_row[name] = {"eval_loss": rows, "expectation_pass_rate": by_prompt}
        numbers = {"eval_loss": ratio(rows), "expectation_pass_rate": ratio(by_prompt), "train_seconds": 1.0}
        variants.append(Variant(name, "lora", numbers=numbers))
    checks = {n: [[Check("contains", "x", bool(k))] if k is not None else [] for k in passed[n]] for n in losses}
    settings = {"decoding": "greedy", "trained_on_numbers": {"run": ["eval_loss"]}}
    return Comparison("m", settings, variants, p, {n: ["x", "y", "z"] for n in losses}, checks, per_row=per_row)


def test_the_best_is_the_reference_and_a_number_measured_on_trained_rows_is_left_out() -> None:
    c = comparison()
    got = c.differences()
    assert set(got) == {"eval_loss", "expectation_pass_rate"}
    # 'run' trained on the held-out chats: 'other' is the best there, and 'run' is not measured against it
    assert got["eval_loss"]["reference"] == "other" and set(got["eval_loss"]["against"]) == {"base"}
    assert got["eval_loss"]["rows"] == 4
    assert got["eval_loss"]["against"]["base"]["difference"] == pytest.approx(2.025 - 1.075)
    assert got["expectation_pass_rate"]["reference"] == "run" and got["expectation_pass_rate"]["best"] == ["run"]
    assert got["expectation_pass_rate"]["against"]["other"]["difference"] == pytest.approx(-0.5)
    # numbers without rows (a run's own eval, its train seconds) are not in it
    c.per_row["other"].pop("eval_loss")
    assert "eval_loss" not in c.differences()


def test_the_report_shows_each_variants_difference_and_marks_those_not_told_apart() -> None:
    c = comparison()
    titles, rows = difference_rows(c)
    assert titles == ["variant", "eval loss (4 rows)", "expectations (2 prompts)"]
    base, run, other = rows
    assert base[0] == "base" and base[1].startswith("+0.95 (+") and base[2] == "-1 (-1 to -1)"
    assert run == ["run", "-", "best"]
    assert other[1] == "best" and other[2] == "≈ -0.5 (-1 to +0)"
    md = render_markdown(c)
    assert "## Against the best: difference \\(95% interval\\)" in md
    assert "| other | best | ≈ -0.5 \\(-1 to +0\\) |" in md


def test_every_variant_is_set_against_the_one_named() -> None:
    """compare --against base: which variants the rows tell apart from the base, whichever is best."""
    c = comparison()
    c.settings["against"] = "base"
    got = c.differences()
    assert {key: d["reference"] for key, d in got.items()} == {"eval_loss": "base", "expectation_pass_rate": "base"}
    assert got["eval_loss"]["best"] == ["other"] and set(got["eval_loss"]["against"]) == {
        "other"
    }  # 'run' trained there
    assert got["expectation_pass_rate"]["against"]["run"]["difference"] == 1.0
    titles, rows = difference_rows(c)
    assert rows[0] == ["base", "reference", "reference"] and rows[1][1:] == ["-", "+1 (+1 to +1)"]
    assert "## Against base: difference \\(95% interval\\)" in render_markdown(c)
    c.settings["against"] = "run"  # it has no held-out eval loss of its own: that quality is left out
    assert set(c.differences()) == {"expectation_pass_rate"}


def test_each_reply_shows_its_score_against_the_reference_beside_its_checks(tmp_path) -> None:
    from tunelab.report import write_report

    c = comparison()
    c.prompts[0].reference = "The <b>answer</b>."
    for name, f1 in (("base", 0.0), ("run", 1.0), ("other", 2 / 3)):
        c.per_row[name]["reference_f1"] = [(f1, 1.0), (0.0, 0.0), (0.0, 0.0)]  # prompts 2 and 3 have none
    md = write_report(c, tmp_path)["md"].read_text().splitlines()
    at = md.index("## Prompt 1: q0")
    assert md[at + 2] == "reference: The &lt;b&gt;answer&lt;/b&gt;."
    assert md[at + 6 : at + 9] == [
        "| base | x | ✗ contains x ref F1 0.00 |",
        "| run | x | ✓ contains x ref F1 1.00 |",
        "| other | x | ✓ contains x ref F1 0.67 |",
    ]
    assert "| run | y | ✓ contains x |" in md  # prompt 2: no reference, no score
    html = (tmp_path / "report.html").read_text()
    assert html.count("<span class='score'>ref F1 ") == 3 and "The &lt;b&gt;answer&lt;/b&gt;." in html


def test_the_best_line_names_the_variants_the_rows_cannot_tell_apart_from_the_best() -> None:
    from rich.console import Console

    from tunelab.report.terminal import print_comparison

    def best_line(c: Comparison) -> str:
        console = Console(record=True, width=200)
        print_comparison(c, console)
        return next(line for line in console.export_text().splitlines() if line.startswith("best: "))

    c = comparison()
    # the terminal's differences table has the qualities its summary shows (ref F1 and expectations, not exact)
    for name in c.per_row:
        c.per_row[name]["exact_match"] = c.per_row[name]["expectation_pass_rate"]
        c.variants[[v.name for v in c.variants].index(name)].numbers["exact_match"] = ratio(
            c.per_row[name]["exact_match"]
        )
    console = Console(record=True, width=200)
    print_comparison(c, console)
    header = next(
        line for line in console.export_text().splitlines() if line.lstrip().startswith("variant") and "rows" in line
    )
    assert "eval loss (4 rows)" in header and "expectations (2 prompts)" in header and "exact" not in header
    assert "exact \\(2 prompts\\)" in render_markdown(c)  # the report files have every quality
    c = comparison()
    # 'other' passes 1 of 2 expectations to run's 2 of 2: an interval that holds 0; the base's 0 of 2 does not
    assert best_line(c) == "best: eval loss: other; expectations: run (≈ other)"
    c.settings["against"] = "base"  # set against another: the best line says only the best
    assert best_line(c) == "best: eval loss: other; expectations: run"
