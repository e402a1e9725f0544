"""A small invented world: the pre-training corpus of the built-in model and the bundled datasets.

Everything is generated from a seed, so the built-in model and `examples/data/` can be rebuilt
byte for byte (`python -m tunelab.tinyworld examples/data`). The base model reads the facts as plain
prose; the SFT set teaches it to answer them in chat form; the preference set pairs a correct
answer (chosen) with a wrong one (rejected).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 1234

_SYLLABLES = ["ka", "lo", "ve", "ri", "tan", "mo", "sel", "du", "pra", "zin", "or", "bel", "ko", "ria", "nu", "vas"]
_ANIMALS = ["otter", "heron", "lynx", "badger", "falcon", "tortoise", "fox", "salmon", "owl", "hare", "beaver", "crane"]
_COLOURS = ["red", "blue", "green", "gold", "white", "black", "purple", "orange", "silver", "grey"]
_FOODS = ["bread", "rice", "cheese", "plums", "fish", "beans", "honey", "apples", "soup", "nuts"]

GLOSSARY = {
    "lora_alpha": "lora_alpha scales the LoRA update; the update is multiplied by alpha divided by r.",
    "r": "r is the LoRA rank; a higher rank gives the adapter more capacity.",
    "lora_dropout": "lora_dropout is dropout on the LoRA input; it regularises the adapter.",
    "target_modules": "target_modules says where LoRA attaches inside the model.",
    "q_proj": "q_proj is the query projection of the attention block.",
    "v_proj": "v_proj is the value projection of the attention block.",
    "lm_head": "lm_head maps hidden states to vocabulary logits.",
    "learning rate": "The learning rate sets how large each parameter update is.",
    "an epoch": "An epoch is one full pass through the training data.",
    "gradient accumulation": "Gradient accumulation sums gradients over several steps before an update.",
    "max_length": "max_length is how many tokens each training example may occupy.",
    "DPO": "DPO trains a model to prefer the chosen answer over the rejected one.",
}


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    animal: str
    colour: str
    food: str


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


def countries(seed: int = SEED, n: int = 24) -> list[Country]:
    rng = random.Random(seed)
    names: set[str] = set()
    out = []
    while len(out) < n:
        name, capital = _word(rng, 2), _word(rng, 3)
        if name in names or capital in names:
            continue
        names |= {name, capital}
        out.append(Country(name, capital, rng.choice(_ANIMALS), rng.choice(_COLOURS), rng.choice(_FOODS)))
    return out


def _fact_sentences(c: Country) -> list[str]:
    return [
        f"The capital of {c.name} is {c.capital}.",
        f"{c.capital} is the capital city of {c.name}.",
        f"The national animal of {c.name} is the {c.animal}.",
        f"In {c.name} the {c.animal} is the national animal.",
        f"The flag of {c.name} is {c.colour}.",
        f"People in {c.name} like to eat {c.food}.",
        f"{c.name} is known for {c.food} and for the {c.animal}.",
    ]


def pretrain_corpus(seed: int = SEED) -> list[str]:
    """Plain prose paragraphs: the facts, small sums and the glossary, in shuffled order."""
    rng = random.Random(seed + 1)
    sentences = [s for c in countries(seed) for s in _fact_sentences(c)]
    sentences += list(GLOSSARY.values())
    sentences += [f"{a} plus {b} is {a + b}." for a in range(10) for b in range(10)]
    paragraphs = []
    for _ in range(600):
        paragraphs.append(" ".join(rng.sample(sentences, 6)))
    return paragraphs


def _qa(c: Country) -> list[tuple[str, str, str]]:
    """(question, answer, a wrong answer) triples about one country."""
    other = c.capital[::-1].capitalize()
    return [
        (
            f"What is the capital of {c.name}?",
            f"The capital of {c.name} is {c.capital}.",
            f"The capital of {c.name} is {other}.",
        ),
        (
            f"Which animal is the national animal of {c.name}?",
            f"The national animal of {c.name} is the {c.animal}.",
            f"The national animal of {c.name} is the {'crane' if c.animal != 'crane' else 'owl'}.",
        ),
        (
            f"What colour is the flag of {c.name}?",
            f"The flag of {c.name} is {c.colour}.",
            f"The flag of {c.name} is {'pink' if c.colour != 'pink' else 'brown'}.",
        ),
        (
            f"What do people in {c.name} like to eat?",
            f"People in {c.name} like to eat {c.food}.",
            f"People in {c.name} never eat {c.food}.",
        ),
    ]


def _sum_qa(a: int, b: int) -> tuple[str, str, str]:
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + 1}."


def _glossary_qa(term: str, text: str) -> tuple[str, str, str]:
    return f"What does {term} mean?", text, f"{term} is a kind of fruit."


SYSTEM = "You are a concise assistant for the tiny world."


def _all_qa(seed: int) -> list[tuple[str, str, str]]:
    qa = [t for c in countries(seed) for t in _qa(c)]
    qa += [_sum_qa(a, b) for a in range(10) for b in range(10)]
    qa += [_glossary_qa(k, v) for k, v in GLOSSARY.items()]
    return qa


def datasets(seed: int = SEED) -> dict[str, list[dict]]:
    """The bundled files: SFT chats, preference pairs and held-out prompts with expectations."""
    rng = random.Random(seed + 2)
    qa = _all_qa(seed)
    rng.shuffle(qa)
    held_out, train = qa[:40], qa[40:]

    def chat(items: list[tuple[str, str, str]], system: bool) -> dict:
        messages = [{"role": "system", "content": SYSTEM}] if system else []
        for q, a, _ in items:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": messages}

    sft_train = [chat([t], system=i % 3 == 0) for i, t in enumerate(train)]
    sft_train += [chat(rng.sample(train, 2), system=i % 2 == 0) for i in range(60)]
    sft_eval = [chat([t], system=False) for t in held_out]

    def pair(q: str, a: str, w: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": w}],
        }

    pref = [pair(*t) for t in train]
    pref_eval = [pair(*t) for t in held_out]
    prompts = [{"prompt": q, "contains": [_key_word(a)]} for q, a, _ in held_out[:32]]
    return {
        "sft_train.jsonl": sft_train,
        "sft_eval.jsonl": sft_eval,
        "pref_train.jsonl": pref,
        "pref_eval.jsonl": pref_eval,
        "prompts.jsonl": prompts,
    }


def _key_word(answer: str) -> str:
    """The word an answer must contain to be right: its last word, without the full stop."""
    return answer.rstrip(".").split()[-1]


def write_datasets(folder: Path, seed: int = SEED) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in datasets(seed).items():
        path = folder / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_datasets(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/data")):
        print(p)
