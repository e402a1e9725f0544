"""tunelab's tokenization of chat data vs a plain script's, in one session.

`train` tokenizes every row and derives its loss mask (tunelab.templates.encode: the template rendered once per
assistant turn to place each reply, then the whole batch of rows tokenized in one call, which the tokenizer's
Rust side spreads over the cores). A plain TRL script's SFTTrainer tokenizes each row with
`apply_chat_template(tokenize=True)`, one call per row, with no loss mask. Both run here on the same chats
(1 to 6 exchanges, replies of 20 to 300 words) with Meta's Llama 3 tokenizer (tests/chat_fixtures.py), repeated
and interleaved; prints tokens per second and the ratio (median of the repeats).

Then the memory the tokenized rows take on their way to the trainer: tunelab keeps them as columns (32-bit ids, a
byte of loss mask a token) and builds the trainer's Arrow dataset from those; the baseline is the same tokens as
Python lists (a list of ints per row, as a script or tunelab before holds them) and `Dataset.from_list` of rows
with their labels. Python objects measured with tracemalloc, Arrow buffers by their size; prints bytes a token and
the ratio, and the seconds each takes to build the trainer's dataset.

Last, the same rows tokenized in one process and in as many as there are cores (what `train` does for a split of
20,000 rows or more: the template renders in Python, a core a process), with the ratio.

    .venv/bin/python bench/encode.py [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = (REPO / "README.md").read_text().split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(20)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 6)):
            messages += [
                {"role": "user", "content": text(rng.randint(5, 60))},
                {"role": "assistant", "content": text(rng.randint(20, 300))},
            ]
        rows.append({"messages": messages})
    return rows


def plain(tokenizer, rows: list[dict]) -> int:
    return sum(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows
    )


def tunelab(tokenizer, rows: list[dict]) -> int:
    from tunelab.templates import encode

    encoded = encode(tokenizer, rows, [f"row {i}" for i in range(len(rows))])
    return int(encoded.lengths().sum())


def processes(tokenizer, rows: list[dict]) -> None:
    from tunelab.inputs import encode_workers
    from tunelab.templates import encode

    workers = encode_workers()
    origins = [f"row {i}" for i in range(len(rows))]
    seconds = {}
    for n in (1, workers):
        start = time.perf_counter()
        encode(tokenizer, rows, origins, workers=n)
        seconds[n] = time.perf_counter() - start
    print(
        f"{len(rows):,} rows in 1 process {seconds[1]:.1f} s, in {workers} {seconds[workers]:.1f} s "
        f"(starting them included): {seconds[1] / seconds[workers]:.2f}x"
    )


def memory(tokenizer, rows: list[dict]) -> None:
    import tracemalloc

    from datasets import Dataset

    from tunelab.templates import encode

    encoded = encode(tokenizer, rows, [f"row {i}" for i in range(len(rows))])
    tokens = int(encoded.lengths().sum())
    columns = sum(c.nbytes for c in encoded.examples.columns())
    tracemalloc.start()
    as_lists = list(encoded.examples)  # each row's ids and mask as Python lists
    lists = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    start = time.perf_counter()
    labelled = [
        {"input_ids": e.input_ids, "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)]}
        for e in as_lists
    ]
    from_lists = Dataset.from_list(labelled)
    list_seconds = time.perf_counter() - start
    del labelled, as_lists
    start = time.perf_counter()
    from_columns = encoded.dataset()
    column_seconds = time.perf_counter() - start
    assert from_columns["labels"][:50] == from_lists["labels"][:50]
    before, after = lists + from_lists.data.nbytes, columns + from_columns.data.nbytes
    print(
        f"tokenized rows, {tokens:,} tokens: as lists {lists / tokens:.1f} B/token + dataset "
        f"{from_lists.data.nbytes / tokens:.1f} B/token; as columns {columns / tokens:.1f} + "
        f"{from_columns.data.nbytes / tokens:.1f} B/token: {before / after:.1f}x less memory; the trainer's dataset "
        f"built in {column_seconds:.2f} s vs {list_seconds:.2f} s ({list_seconds / column_seconds:.0f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.chat_fixtures import FIXTURES, meta_llama3_tokenizer

    tokenizer = meta_llama3_tokenizer((FIXTURES / "llama-3.1-instruct.jinja").read_text())
    rows = chats(args.rows)
    ratios = []
    for repeat in range(args.repeats):
        seconds = {}
        for name, run in sorted({"plain": plain, "tunelab": tunelab}.items(), reverse=bool(repeat % 2)):
            start = time.perf_counter()
            tokens = run(tokenizer, rows)
            seconds[name] = time.perf_counter() - start
            print(f"repeat {repeat} {name:8s} {tokens / seconds[name]:>10,.0f} tokens/s ({tokens:,} tokens)")
        ratios.append(seconds["plain"] / seconds["tunelab"])
    cores = len(os.sched_getaffinity(0))
    print(f"tunelab (tokens and loss masks) vs plain (tokens only), {cores} cores: {statistics.median(ratios):.2f}x")
    memory(tokenizer, rows)
    processes(tokenizer, chats(args.rows * 5, seed=1))


if __name__ == "__main__":
    main()
