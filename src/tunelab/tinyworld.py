"""A small invented world: the pre-training corpus of the built-in model and the bundled datasets.

Everything is generated from a seed, so the built-in model and `examples/data/` can be rebuilt
byte for byte (`python -m tunelab.tinyworld examples/data`). The three were designed together so that
the demo measures what each method teaches:

- The base model reads every country's capital, animal, flag and food as plain prose
  (country profiles, where a name recurs sentence after sentence, and mixed paragraphs). It never sees a
  chat, so asked a question in chat form it rambles.
- SFT teaches the answer format on three facts of each country. The held-out prompts ask the fourth
  (known to the base only as prose) and trained facts in new words; an answer is right when it starts
  with the fact sentence. A tuned model answers so; the base recites facts, in no order, after some noise.
- The preference pairs are about the countries' languages, which the base knows only by name: the rejected
  answer is another language in the same words, so the base starts near chance, and DPO's effect shows on
  the same questions in new words (pref_eval.jsonl).
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

# The countries' languages: the base reads their names, never which country speaks which, so it has no
# preference between them; each is spoken in four countries.
LANGUAGES = ["Kelvish", "Ostric", "Umbrish", "Pelan", "Drossic", "Yarrow"]

SYSTEM = "You are a concise assistant for the tiny world."


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    animal: str
    colour: str
    food: str
    language: str


@dataclass(frozen=True)
class Fact:
    """One thing to know about a country: how prose says it, how a chat asks it, and the answer."""

    prose: tuple[str, ...]  # the base model's sentences
    questions: tuple[str, ...]  # the phrasings SFT trains on, then the new words held out (the last)
    answer: str  # the answer sentence


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
        language = LANGUAGES[len(out) % len(LANGUAGES)]
        out.append(Country(name, capital, rng.choice(_ANIMALS), rng.choice(_COLOURS), rng.choice(_FOODS), language))
    return out


def facts(c: Country) -> list[Fact]:
    """The four facts the base model reads about a country."""
    n = c.name
    return [
        Fact(
            (f"The capital of {n} is {c.capital}.", f"{c.capital} is the capital city of {n}."),
            (
                f"What is the capital of {n}?",
                f"Which city is the capital of {n}?",
                f"Tell me the capital of {n}.",
                f"Do you know the capital of {n}?",
                f"Name the capital city of {n}.",
            ),
            f"The capital of {n} is {c.capital}.",
        ),
        Fact(
            (f"The national animal of {n} is the {c.animal}.", f"In {n} the {c.animal} is the national animal."),
            (
                f"What is the national animal of {n}?",
                f"Which animal is the national animal of {n}?",
                f"Tell me the national animal of {n}.",
                f"Do you know the national animal of {n}?",
                f"Name the national animal of {n}.",
            ),
            f"The national animal of {n} is the {c.animal}.",
        ),
        Fact(
            (f"The flag of {n} is {c.colour}.", f"{n} flies a {c.colour} flag."),
            (
                f"What colour is the flag of {n}?",
                f"Which colour is the flag of {n}?",
                f"Tell me the colour of the flag of {n}.",
                f"Do you know the colour of the flag of {n}?",
                f"Name the colour of the flag of {n}.",
            ),
            f"The flag of {n} is {c.colour}.",
        ),
        Fact(
            (f"People in {n} like to eat {c.food}.", f"{n} is known for its {c.food}."),
            (
                f"What do people in {n} like to eat?",
                f"Which food do people in {n} like?",
                f"Tell me what people in {n} like to eat.",
                f"Do you know what people in {n} like to eat?",
                f"Name the food people in {n} like.",
            ),
            f"People in {n} like to eat {c.food}.",
        ),
    ]


def language(c: Country) -> tuple[tuple[str, str, str], str, str]:
    """The preference question about a country's language (not in the base's reading): the phrasings, the
    right answer and a wrong one in the same words (the next language in the list, so that every language is
    as often wrong as right)."""
    n, wrong = c.name, LANGUAGES[(LANGUAGES.index(c.language) + 1) % len(LANGUAGES)]
    questions = (
        f"Which language do people speak in {n}?",
        f"What language is spoken in {n}?",
        f"Tell me the language of {n}.",
    )
    return questions, f"People in {n} speak {c.language}.", f"People in {n} speak {wrong}."


def pretrain_corpus(seed: int = SEED) -> list[str]:
    """Plain prose: country profiles (one country's facts in shuffled order, its name recurring) and
    paragraphs of facts about several countries."""
    rng = random.Random(seed + 1)
    world = countries(seed)
    paragraphs = []
    for _ in range(16):
        for c in world:
            sentences = [rng.choice(f.prose) for f in facts(c)]
            rng.shuffle(sentences)
            paragraphs.append(" ".join(sentences))
    loose = [s for c in world for f in facts(c) for s in f.prose]
    loose += [f"{name} is one of the languages of the tiny world." for name in LANGUAGES] * 4
    for _ in range(150):
        paragraphs.append(" ".join(rng.sample(loose, 6)))
    rng.shuffle(paragraphs)
    return paragraphs


def _split(seed: int) -> tuple[list[Fact], list[Fact]]:
    """The facts SFT trains on and those it never asks: one per country, the attribute rotating."""
    trained, held = [], []
    for i, c in enumerate(countries(seed)):
        for j, f in enumerate(facts(c)):
            (held if j == i % 4 else trained).append(f)
    return trained, held


def _expect(f: Fact) -> dict:
    """A right answer starts with the fact sentence: the fact, in the format SFT teaches (the base, which has
    read the facts, recites them somewhere in its rambling); the sentence is the reference answer compare scores
    the reply against too."""
    # names and words only: the full stop is all to escape
    return {"regex": ["^" + f.answer.replace(".", r"\.")], "reference": f.answer}


def datasets(seed: int = SEED) -> dict[str, list[dict]]:
    """The bundled files: SFT chats, preference pairs and held-out prompts with expectations."""
    rng = random.Random(seed + 3)
    trained, held = _split(seed)

    def chat(pairs: list[tuple[str, str]], system: bool) -> dict:
        messages = [{"role": "system", "content": SYSTEM}] if system else []
        for q, a in pairs:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": messages}

    train_qa = [(q, f.answer) for f in trained for q in f.questions[:-1]]
    sft_train = [chat([qa], system=i % 3 == 0) for i, qa in enumerate(train_qa)]
    sft_train += [chat(rng.sample(train_qa, 2), system=i % 2 == 0) for i in range(60)]
    rng.shuffle(sft_train)

    # Held out: the facts SFT never asked (in its phrasings), and trained facts in new words.
    new_words = rng.sample(trained, 16)
    unasked = [(rng.choice(f.questions[:-1]), f) for f in held]
    asked_anew = [(f.questions[-1], f) for f in new_words]
    sft_eval = [chat([(q, f.answer)], system=False) for q, f in unasked + asked_anew]
    prompts = [{"prompt": q, **_expect(f)} for q, f in unasked[:16] + asked_anew]

    def pair(question: str, right: str, wrong: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": right}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }

    spoken = [language(c) for c in countries(seed)]
    pref_train = [pair(q[k], right, wrong) for q, right, wrong in spoken for k in (0, 1)]
    rng.shuffle(pref_train)
    pref_eval = [pair(q[2], right, wrong) for q, right, wrong in spoken]

    # GRPO: capital questions and what the rewards (examples/rewards.py) check the sampled replies for; held out,
    # the phrasing SFT never trains on.
    def asked(question: str, c: Country) -> dict:
        return {"prompt": [{"role": "user", "content": question}], "country": c.name, "capital": c.capital}

    capitals = [(facts(c)[0].questions, c) for c in countries(seed)]
    grpo_train = [asked(q, c) for questions, c in capitals for q in questions[:-1]]
    rng.shuffle(grpo_train)
    grpo_eval = [asked(questions[-1], c) for questions, c in capitals]

    # distill: the questions SFT trains on and holds out, without their answers; a teacher (an SFT run) answers them
    # through its next-token distributions on the student's own replies.
    def question(q: str) -> dict:
        return {"prompt": [{"role": "user", "content": q}]}

    distill_train = [question(q) for q, _ in train_qa]
    rng.shuffle(distill_train)
    distill_eval = [question(q) for q, _ in unasked + asked_anew]
    # GRPO against a reward model trained on the pairs (examples/reward.yaml): the pairs' questions without answers.
    pref_prompts_train = [{"prompt": p["prompt"]} for p in pref_train]
    pref_prompts_eval = [{"prompt": p["prompt"]} for p in pref_eval]
    return {
        "sft_train.jsonl": sft_train,
        "sft_eval.jsonl": sft_eval,
        "pref_train.jsonl": pref_train,
        "pref_eval.jsonl": pref_eval,
        "prompts.jsonl": prompts,
        "grpo_train.jsonl": grpo_train,
        "grpo_eval.jsonl": grpo_eval,
        "distill_train.jsonl": distill_train,
        "distill_eval.jsonl": distill_eval,
        "pref_prompts_train.jsonl": pref_prompts_train,
        "pref_prompts_eval.jsonl": pref_prompts_eval,
    }


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
