"""tunelab's tokenization of chat data vs a plain script's, in one session.

`train` tokenizes every row and derives its loss mask (tunelab.templates.encode: the template rendered once per
assistant turn to place each reply, then the whole batch of rows tokenized in one call, which the tokenizer's
Rust side spreads over the cores). A plain TRL script's SFTTrainer tokenizes each row with
`apply_chat_template(tokenize=True)`, one call per row, with no loss mask. Both run here on the same chats
(1 to 6 exchanges, replies of 20 to 300 words) with Meta's Llama 3 tokenizer (tests/chat_fixtures.py), repeated
and interleaved; prints tokens per second and the ratio (median of the repeats).

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
    return sum(len(e.input_ids) for e in encoded.examples)


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


if __name__ == "__main__":
    main()
