"""Documents of the tiny-world tasks, read from the bundled held-out data (examples/data/, found from this file, so
the tasks work from any working directory), and tinyworld_answers' key_word metric."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
HELD_OUT = DATA / "sft_eval.jsonl"
PAIRS = DATA / "pref_eval.jsonl"


def answers(**kwargs):
    import datasets

    rows = []
    for line in HELD_OUT.read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"question": messages[0]["content"], "answer": messages[1]["content"]})
    return {"test": datasets.Dataset.from_list(rows)}


def choices(**kwargs):
    """The right answer and the wrong one, in an order that alternates so position says nothing."""
    import datasets

    rows = []
    for i, line in enumerate(PAIRS.read_text().splitlines()):
        pair = json.loads(line)
        right, wrong = " " + pair["chosen"][0]["content"], " " + pair["rejected"][0]["content"]
        options = [right, wrong] if i % 2 == 0 else [wrong, right]
        rows.append({"question": pair["prompt"][0]["content"], "choices": options, "label": options.index(right)})
    return {"test": datasets.Dataset.from_list(rows)}


def key_word(references, predictions, **kwargs) -> float:
    """1.0 when the answer's last word (the fact itself: a capital, colour, number) is in the output."""
    word = references[0].rstrip(".").split()[-1].lower()
    return float(word in predictions[0].lower())
