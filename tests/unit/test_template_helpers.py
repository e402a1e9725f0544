"""The small decisions of templates.py, each against values worked out by hand: which fix a template's refusal
suggests, and which ids end a generated reply."""

import pytest

from tunelab.errors import TunelabError
from tunelab.templates import refusal_fix, stop_token_ids


def roles(*names: str) -> list[dict]:
    return [{"role": n, "content": "x"} for n in names]


@pytest.mark.parametrize(
    ("error", "messages", "fix"),
    [
        ("System role not supported", roles("system", "user"), "set tokenizer.fold_system: true"),
        # a refusal that names "system" while the conversation has none is about something else
        ("System prompt too long", roles("user", "user"), "set data.merge_consecutive_turns: true"),
        ("Conversation roles must alternate user/assistant", roles("user", "user"), "set data.merge_consecutive_"),
        ("Conversation roles must alternate", roles("assistant", "user"), "make the conversation start with a user"),
        ("Only user and assistant roles are supported", roles("tool", "user"), "make the conversation start"),
        ("Something else", roles("user", "assistant"), "fix the record, or set tokenizer.chat_template"),
    ],
)
def test_the_fix_a_template_refusal_suggests(error: str, messages: list[dict], fix: str) -> None:
    assert refusal_fix(ValueError(error), messages).startswith(fix)


def test_stop_ids_keep_the_configured_order_then_add_what_is_missing() -> None:
    assert stop_token_ids(None, [7, None, 7]) == [7]
    assert stop_token_ids(3, [3, 9]) == [3, 9]
    assert stop_token_ids([5, 3], [3, 9, 5, 11]) == [5, 3, 9, 11]
    assert stop_token_ids([], [None]) == []


def test_plain_prompt_completion_and_text_rows_supervise_the_right_tokens(tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from tunelab.templates import tokenize_example

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = tokenize_example(tok, {"prompt": "What is the capital of Nuri?", "completion": " Kavelo."})
    pairs = list(zip(t.input_ids, t.loss_mask, strict=True))
    assert tok.decode([i for i, m in pairs if not m]) == "What is the capital of Nuri?"
    assert tok.decode([i for i, m in pairs if m]) == " Kavelo.<|eot_id|>"
    whole = tokenize_example(tok, {"text": "The flag of Nuri is red."})
    assert tok.decode(whole.input_ids) == "The flag of Nuri is red.<|eot_id|>" and all(whole.loss_mask)


def test_encoding_in_batches_gives_each_row_what_it_gives_alone(tiny_model_dir) -> None:
    """`encode` renders rows one by one and tokenizes them a batch at a time; rows of every shape, across the
    boundary between batches, come out in order with the tokens and masks each gives alone."""
    import json

    from transformers import AutoTokenizer

    from tests.conftest import DATA
    from tunelab.templates import ENCODE_BATCH, encode, tokenize_example

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    shapes = [
        lambda i: chats[i % len(chats)],
        lambda i: {"prompt": f"Question {i}?", "completion": f" Answer {i}."},
        lambda i: {"text": f"Plain text number {i}."},
        lambda i: {
            "prompt": chats[i % len(chats)]["messages"][:1],
            "completion": chats[i % len(chats)]["messages"][1:2],
        },
    ]
    rows = [shapes[(i * 7) % len(shapes)](i) for i in range(ENCODE_BATCH + 37)]
    encoded = encode(tok, rows, [f"row {i}" for i in range(len(rows))])
    assert list(encoded.examples) == [tokenize_example(tok, row) for row in rows]
    assert len({tuple(e.input_ids) for e in encoded.examples}) > len(rows) // 2


def test_encoded_rows_give_the_trainer_and_the_plan_what_lists_of_tokens_would(tiny_model_dir) -> None:
    """Encoded splits keep their tokens as columns; the trainer's dataset, the lengths, the loss tokens within
    max_length and the rows cut to no loss must be what the same tokens held as lists give."""
    import json

    from transformers import AutoTokenizer

    from tests.conftest import DATA
    from tunelab.templates import encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()][:60]
    rows += [{"text": "Plain text."}, {"prompt": "Q?", "completion": " A."}]
    encoded = encode(tok, rows, [f"row {i}" for i in range(len(rows))])
    examples = list(encoded.examples)
    dataset = encoded.dataset()
    assert dataset["input_ids"] == [e.input_ids for e in examples]
    assert dataset["labels"] == [
        [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)] for e in examples
    ]
    assert encoded.lengths().tolist() == [len(e.input_ids) for e in examples]
    for cut in (1, 12, 30, 10_000):
        assert encoded.loss_tokens(cut).tolist() == [sum(e.loss_mask[:cut]) for e in examples]
        assert encoded.no_loss_after(cut) == [
            o for e, o in zip(examples, encoded.origins, strict=True) if not any(e.loss_mask[:cut])
        ]
    assert encoded.no_loss_after(12) and not encoded.no_loss_after(10_000)  # the cut takes every reply of some rows
    # Arrow's 32-bit list offsets: past the limit the rows go in several arrays, each row whole, none left out.
    limit = int(encoded.lengths().sum()) // 5
    chunked = encoded.dataset(limit=limit)
    assert chunked.data.column("input_ids").num_chunks >= 5 and dataset.data.column("input_ids").num_chunks == 1
    assert max(len(c.values) for c in chunked.data.column("labels").chunks) <= limit
    assert chunked["input_ids"] == dataset["input_ids"] and chunked["labels"] == dataset["labels"]
    assert encoded.examples[-1] == examples[-1] and encoded.examples[1:3] == examples[1:3]


def test_encoding_in_several_processes_gives_what_one_process_gives(tiny_model_dir) -> None:
    """A large split is tokenized in processes of its own (the template renders in Python, a core a process); the
    rows, their order, the checks' findings and a bad row's one-line error must not depend on it."""
    import json

    from transformers import AutoTokenizer

    from tests.conftest import DATA
    from tunelab.templates import ENCODE_BATCH, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    rows = [chats[i % len(chats)] for i in range(3 * ENCODE_BATCH + 37)]
    rows[5] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0}]}
    rows[700] = {"text": "Plain text carries loss on every token."}
    origins = [f"train.jsonl:{i + 1}" for i in range(len(rows))]
    alone, shared = encode(tok, rows, origins), encode(tok, rows, origins, workers=2)
    assert list(shared.examples) == list(alone.examples) and shared.origins == origins
    assert (shared.no_loss, shared.all_loss, shared.unterminated) == (alone.no_loss, alone.all_loss, alone.unterminated)
    assert shared.terminators == alone.terminators and "train.jsonl:6" in shared.no_loss
    tok.chat_template = "{% if messages[0].content == 'BAD' %}{{ raise_exception('bad row') }}{% endif %}" + (
        tok.chat_template
    )
    rows[800] = {"messages": [{"role": "user", "content": "BAD"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(TunelabError) as error:
        encode(tok, rows, origins, workers=2)
    with pytest.raises(TunelabError) as serial:
        encode(tok, rows, origins)
    assert str(error.value) == str(serial.value) and str(error.value).startswith("train.jsonl:801: ")
