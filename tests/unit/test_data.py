import json
from pathlib import Path

import pytest

from tests.conftest import DATA, dataset_repository
from tunelab.config import DataSettings
from tunelab.data import load_splits, overlap_warnings
from tunelab.errors import TunelabError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path: Path, method: str = "sft", **kw):
    return load_splits(DataSettings(train=str(path), **kw), method, seed=0)


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("row", "fmt", "normalised"),
    [
        (CHAT, "messages", CHAT),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            "conversations",
            CHAT,
        ),
        ({"instruction": "hi", "output": "hello"}, "alpaca", CHAT),
        (
            {"instruction": "Sum", "input": "1 2", "output": "3"},
            "alpaca",
            {"messages": [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]},
        ),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion", {"prompt": "2+2=", "completion": "4"}),
        ({"text": "plain"}, "text", {"text": "plain"}),
    ],
)
def test_sft_formats_detected_and_normalised(tmp_path: Path, row: dict, fmt: str, normalised: dict) -> None:
    splits = load(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert splits.format == fmt
    assert splits.train.rows == [normalised]


def test_preference_forms(tmp_path: Path) -> None:
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        },
    ]
    splits = load(write_jsonl(tmp_path / "p.jsonl", rows), method="dpo")
    assert splits.format == "preference"
    assert [sorted(r) for r in splits.train.rows] == [["chosen", "prompt", "rejected"]] * 3
    assert splits.train.rows[2] == splits.train.rows[1]  # the implicit prompt is the shared prefix


def test_other_file_types(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    (tmp_path / "a.csv").write_text("prompt,completion\nq,a\nq2,a2\n")
    assert [r["text"] for r in load(tmp_path / "a.json").train.rows] == ["one", "two"]
    assert load(tmp_path / "a.csv").train.rows[1] == {"prompt": "q2", "completion": "a2"}


def test_parquet_and_datasets_folder(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}])
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    assert [r["text"] for r in load(tmp_path / "a.parquet").train.rows] == ["one", "two"]
    assert [r["text"] for r in load(tmp_path / "folder").train.rows] == ["one", "two"]


def test_eval_fraction_is_seeded_and_disjoint(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}"} for i in range(20)])
    a, b = load(path, eval_fraction=0.25), load(path, eval_fraction=0.25)
    assert len(a.eval.rows) == 5 and len(a.train.rows) == 15
    assert a.eval.rows == b.eval.rows
    assert not {r["text"] for r in a.eval.rows} & {r["text"] for r in a.train.rows}


def test_rows_that_each_ask_their_own_are_held_out_as_the_seeded_shuffle_draws_them(tmp_path: Path) -> None:
    """Holding out whole prompts leaves data whose rows all differ split as before: the first rows of the seeded
    shuffle, so a run started before keeps its held-out set on a resume."""
    import random

    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(40)]
    order = list(range(40))
    random.Random(0).shuffle(order)
    splits = load(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.1)
    assert [r["prompt"] for r in splits.eval.rows] == [f"q{i}" for i in sorted(order[:4])]
    assert splits.eval.source.endswith("(held out)")


@pytest.mark.parametrize(
    ("rows", "method"),
    [
        ([{"prompt": f"q{i // 3}", "completion": f"a{i}"} for i in range(30)], "sft"),
        ([{"prompt": f"q{i // 2}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(30)], "kto"),
        ([{"text": f"t{i // 3}"} for i in range(30)], "sft"),  # copies of a text row
    ],
    ids=["answers", "kto", "copies"],
)
def test_eval_fraction_holds_out_every_row_of_a_prompt_together(tmp_path: Path, rows: list, method: str) -> None:
    """Rows of one prompt on both sides would score the model on questions it trained on."""
    splits = load(write_jsonl(tmp_path / "d.jsonl", rows), method, eval_fraction=0.2)
    asked = [r.get("prompt", r.get("text")) for r in splits.eval.rows]
    assert not set(asked) & {r.get("prompt", r.get("text")) for r in splits.train.rows}
    group = 2 if method == "kto" else 3
    assert len(asked) == group * len(set(asked)) and len(asked) >= 6
    assert splits.eval.source.endswith("(held out, a prompt's rows together)")
    assert not [w for w in overlap_warnings(splits) if w.startswith("data.eval")]


def test_eval_fraction_holds_out_only_prompts_whose_rows_fit_in_it(tmp_path: Path) -> None:
    rows = [{"prompt": "big", "completion": f"a{i}"} for i in range(30)]
    rows += [{"prompt": f"q{i}", "completion": "a"} for i in range(10)]
    splits = load(write_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.1)
    assert len(splits.eval.rows) == 4 and {r["prompt"] for r in splits.eval.rows} < {f"q{i}" for i in range(10)}
    one = write_jsonl(tmp_path / "one.jsonl", rows[:30])
    with pytest.raises(TunelabError) as e:
        load(one, eval_fraction=0.1)
    assert str(e.value) == (
        "data.eval_fraction: 0.1 of 30 rows is 3, and the rows ask 1 prompt with at least 30 rows each: whole "
        "prompts cannot be held out within it; raise it, or give held-out data in data.eval"
    )


def test_plan_names_training_rows_that_repeat_and_held_out_rows_training_asks(tmp_path: Path) -> None:
    def chat(question: str, answer: str, *earlier: str) -> dict:
        turns = [m for q in earlier for m in ({"role": "user", "content": q}, {"role": "assistant", "content": "ok"})]
        return {"messages": [*turns, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    train = [chat("a", "1"), chat("b", "2"), chat("c", "3"), chat("b", "2"), chat("d", "4", "a"), chat("b", "2")]
    held = [
        chat("e", "5"),
        chat("c", "other"),  # asks what d.jsonl:3 asks
        chat("b", "2"),  # is d.jsonl:2
        chat("d", "4", "z"),  # another conversation before the same last question: not the same ask
        chat("a", "1", "a"),
        {**chat("a", "1"), "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    ]
    more = [chat("f", "6")]
    splits = load(
        write_jsonl(tmp_path / "d.jsonl", train),
        eval=str(write_jsonl(tmp_path / "e.jsonl", held)),
        eval_also={"more": str(write_jsonl(tmp_path / "m.jsonl", [*more, chat("a", "1")]))},
    )
    d, e, m = (str(tmp_path / f) for f in ("d.jsonl", "e.jsonl", "m.jsonl"))
    assert overlap_warnings(splits) == [
        f"data.train: 2 of 6 rows repeat an earlier training row (first: {d}:4 repeats {d}:2); each copy trains "
        "again, so remove the copies unless the repeat is meant",
        f"data.eval: 1 of 6 held-out rows are training rows too (first: {e}:3 is {d}:2), and 1 more ask what a "
        f"training row asks (first: {e}:2 asks what {d}:3 does); what is measured on them is partly recall of the "
        "training data: remove them from one side",
        f"data.eval_also.more: 1 of 2 held-out rows are training rows too (first: {m}:2 is {d}:1); what is measured "
        "on them is partly recall of the training data: remove them from one side",
    ]
    clean = load(write_jsonl(tmp_path / "d.jsonl", train[:3]), eval=str(write_jsonl(tmp_path / "e.jsonl", more)))
    assert overlap_warnings(clean) == []


@pytest.mark.parametrize(
    ("rows", "method", "expected"),
    [
        ([CHAT, "{not json"], "sft", "d.jsonl:2: malformed JSON"),
        ([CHAT, {"messages": [{"role": "user", "content": "q"}]}], "sft", "d.jsonl:2: 'messages' has no assistant"),
        (
            [{"messages": [{"role": "robot", "content": "q"}]}],
            "sft",
            "d.jsonl:1: messages[0] has unknown role 'robot'; roles are system, user, assistant",
        ),
        ([{"prompt": "q", "completion": "a"}, {"prompt": "q"}], "sft", "d.jsonl:2: record has no 'completion' field"),
        ([{"foo": 1}], "sft", "d.jsonl:1: cannot tell the data format from fields ['foo']"),
        (
            [{"prompt": "q", "chosen": "a", "rejected": "b"}],
            "sft",
            "holds preference pairs (chosen/rejected) but method is sft",
        ),
        ([CHAT], "dpo", "holds messages data but method is dpo"),
        ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "dpo", "d.jsonl:1: chosen and rejected are identical"),
        ([{"prompt": "q", "chosen": " ", "rejected": "a"}], "dpo", "d.jsonl:1: 'chosen' is empty"),
        ([{"prompt": "q", "rejected": "a", "chosen": None}], "dpo", "d.jsonl:1: record has no 'chosen' field"),
        ([{"text": "x"}, {"text": 3}], "sft", "d.jsonl:2: 'text' must be str, got int"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, rows: list, method: str, expected: str) -> None:
    with pytest.raises(TunelabError) as e:
        load(write_jsonl(tmp_path / "d.jsonl", rows), method=method)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_cut_short_mid_write_names_its_last_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CHAT) + '\n{"text": "cut sh')  # a writer killed mid-line: no newline at the end
    with pytest.raises(TunelabError, match=r"d.jsonl:2: malformed JSON \(Unterminated string starting at column 10\)$"):
        load(path)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(TunelabError, match="the dataset is empty"):
        load(tmp_path / "d.jsonl")


def test_missing_file_names_key(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="data.train: data file '.*nope.jsonl' not found"):
        load(tmp_path / "nope.jsonl")


def test_bundled_data_is_what_the_generator_makes(tmp_path: Path) -> None:
    from tunelab.tinyworld import write_datasets

    for path in write_datasets(tmp_path):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name


# ---------------------------------------------------------------- shapes users bring


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CHAT) + "\n").encode())
    assert load(path).train.rows == [CHAT]


def test_text_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9") + b"\n")
    with pytest.raises(TunelabError, match=r"latin1.jsonl: not UTF-8 text .*save the file as UTF-8"):
        load(path)


def test_ultrafeedback_binarized_pairs_take_the_shared_conversation_as_prompt(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Name a fruit."}
    row = {
        "prompt": "Name a fruit.",
        "prompt_id": "abc",
        "chosen": [user, {"role": "assistant", "content": "Apple."}],
        "rejected": [user, {"role": "assistant", "content": "A car."}],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    rows = load(write_jsonl(tmp_path / "uf.jsonl", [row]), "dpo").train.rows
    assert rows == [
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "Apple."}],
            "rejected": [{"role": "assistant", "content": "A car."}],
        }
    ]


def test_ultrafeedback_binarized_rows_train_sft_on_their_messages_and_dpo_on_their_pairs(tmp_path: Path) -> None:
    # Every split of HuggingFaceH4/ultrafeedback_binarized (train_sft as train_prefs) holds the pair and the chosen
    # conversation as `messages`: each method reads the form it trains on.
    user = {"role": "user", "content": "Name a fruit."}
    chosen = [user, {"role": "assistant", "content": "Apple."}]
    row = {
        "prompt": "Name a fruit.",
        "prompt_id": "abc",
        "chosen": chosen,
        "rejected": [user, {"role": "assistant", "content": "A car."}],
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    sft = load(path, "sft")
    assert sft.train.rows == [{"messages": chosen}]
    assert sft.format == "messages"
    dpo = load(path, "dpo")
    assert dpo.train.rows[0]["rejected"] == [{"role": "assistant", "content": "A car."}]
    assert dpo.format == "preference"


def test_anthropic_hh_transcripts_become_conversations(tmp_path: Path) -> None:
    row = {
        "chosen": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
        "rejected": "\n\nHuman: Hi there.\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No.",
    }
    rows = load(write_jsonl(tmp_path / "hh.jsonl", [row]), "dpo").train.rows
    assert rows[0]["prompt"] == [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a fruit."},
    ]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Apple."}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "No."}]


def test_openai_weight_is_kept_on_assistant_turns_and_checked(tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "weight": 1},
    ]
    rows = load(write_jsonl(tmp_path / "w.jsonl", [{"messages": turns}])).train.rows
    assert [m.get("weight") for m in rows[0]["messages"]] == [None, 0, None, 1]
    bad = [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]
    with pytest.raises(TunelabError, match=r"w2.jsonl:1: messages\[0\].weight must be 0 or 1, on assistant"):
        load(write_jsonl(tmp_path / "w2.jsonl", [{"messages": bad}]))


def test_sharegpt_turn_weights_and_tool_turns_read_as_openais(tmp_path: Path) -> None:
    """Open-Orca/SlimOrca weighs every turn (null or 0 on prompts, 1 on replies) and axolotl's ShareGPT a reply 0 to
    keep it out of the loss; NousResearch/hermes-function-calling-v1 gives tool results `from: tool`. A reply's
    weight was dropped, so a reply weighed 0 trained."""
    slimorca = {
        "conversations": [
            {"from": "system", "value": "You are an AI assistant.", "weight": None},
            {"from": "human", "value": "Say hi.", "weight": 0.0},
            {"from": "gpt", "value": "Hi.", "weight": 1.0},
            {"from": "human", "value": "Again.", "weight": 0.0},
            {"from": "gpt", "value": "No.", "weight": 0},
        ]
    }
    hermes = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "gpt", "value": '<tool_call>{"name": "w", "arguments": {}}</tool_call>'},
            {"from": "tool", "value": '<tool_response>{"t": 3}</tool_response>'},
            {"from": "gpt", "value": "3 degrees."},
        ]
    }
    openai_named_so = {"conversations": CHAT["messages"]}  # OpenAI's turns under ShareGPT's field name
    rows = load(write_jsonl(tmp_path / "s.jsonl", [slimorca, hermes, openai_named_so])).train.rows
    assert rows[2] == CHAT
    assert [m.get("weight") for m in rows[0]["messages"]] == [None, None, 1, None, 0]
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "tool", "assistant"]
    bad = {"conversations": [{"from": "human", "value": "a", "weight": 1}, {"from": "gpt", "value": "b"}]}
    with pytest.raises(TunelabError, match=r"b.jsonl:1: conversations\[0\].weight must be 0 or 1, on assistant"):
        load(write_jsonl(tmp_path / "b.jsonl", [bad]))


@pytest.mark.parametrize(
    ("row", "columns"),
    [
        (  # lmsys/lmsys-chat-1m
            {"conversation_id": "a", "conversation": CHAT["messages"], "turn": 1, "language": "English"},
            {"conversation": "messages"},
        ),
        ({"question": "2+2?", "answer": "4"}, {"question": "prompt", "answer": "completion"}),  # openai/gsm8k
        ({"type": "GSM", "query": "2+2?", "response": "4"}, {"query": "prompt", "response": "completion"}),  # MetaMath
        ({"prompt": "2+2?", "response": "4", "helpfulness": 3}, {"response": "completion"}),  # nvidia/HelpSteer2
        (
            {"source": "x", "chat": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"chat": "conversations"},
        ),
        (  # lvwerra/stack-exchange-paired
            {"qid": 1, "question": "2+2?", "response_j": "4", "response_k": "5"},
            {"question": "prompt", "response_j": "chosen", "response_k": "rejected"},
        ),
        (  # argilla/ultrafeedback-binarized-preferences
            {"instruction": "2+2?", "chosen_response": "4", "rejected_response": "5", "chosen_avg_rating": 5.0},
            {"instruction": "prompt", "chosen_response": "chosen", "rejected_response": "rejected"},
        ),
        (  # Open-Orca/OpenOrca: its system prompt is kept, as the chat's system turn
            {"id": "niv.1", "system_prompt": "Be brief.", "question": "2+2?", "response": "4"},
            {"question": "prompt", "response": "completion", "system_prompt": "system"},
        ),
    ],
)
def test_fields_no_format_names_are_refused_with_the_columns_that_read_them(
    tmp_path: Path, row: dict, columns: dict
) -> None:
    """The refusal names the data.columns for the fields the record has, and with them the record reads. A row with a
    `prompt` reads as GRPO's prompts, so SFT refuses it with the renaming of its answer."""
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", [row])
    refusal = "holds prompts without answers but method is sft" if "prompt" in row else "cannot tell the data format"
    with pytest.raises(TunelabError, match=rf"d.jsonl(:1)?: {refusal}") as e:
        load(data)
    suggestion = str(e.value).rpartition("rename yours with data.columns: ")[2]
    renames, _, chat = suggestion.partition(" and ")
    suggested = yaml.safe_load(renames)
    assert suggested == columns
    assert chat == (
        "data.as_chat: true (the system prompt then opens each chat)" if "system" in columns.values() else ""
    )
    method = "dpo" if "chosen" in suggested.values() else "sft"
    rows = load(data, method=method, columns=suggested, as_chat=bool(chat)).train.rows
    assert len(rows) == 1
    if chat:
        assert rows[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_openais_developer_role_is_the_system_message(tmp_path: Path) -> None:
    """OpenAI's chat format calls the system message "developer" for its reasoning models; chat templates know a
    system message, so the row reads as one rather than being refused for an unknown role."""
    row = {"messages": [{"role": "developer", "content": "Be brief."}, *CHAT["messages"]]}
    assert load(write_jsonl(tmp_path / "d.jsonl", [row])).train.rows == [
        {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}
    ]


def test_consecutive_turns_of_one_role_merge_when_asked(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    assert load(path).train.rows[0]["messages"] == turns
    merged = load(path, merge_consecutive_turns=True).train.rows[0]["messages"]
    assert merged == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_a_saved_dataset_names_its_splits_when_the_one_asked_for_is_missing(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list([CHAT])}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TunelabError, match=r"no split 'train'; its splits are train_sft: set data.hub_split"):
        load(tmp_path / "saved")
    assert load(tmp_path / "saved", hub_split="train_sft").train.rows == [CHAT]


def test_a_downloaded_dataset_repository_reads_its_named_splits(tmp_path: Path) -> None:
    other = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    repo = dataset_repository(tmp_path / "ultrachat", {"train_sft": [CHAT, CHAT], "test_sft": [other]})
    with pytest.raises(TunelabError, match=r"has no split 'train'; its splits are train_sft, test_sft: set data.hub_s"):
        load(repo)
    splits = load(repo, hub_split="train_sft", eval=str(repo), eval_split="test_sft")
    assert (splits.train.rows, splits.eval.rows) == ([CHAT, CHAT], [other])
    assert splits.train.origins == [f"{repo}#1", f"{repo}#2"]
    assert set(splits.hashes) == {str(repo), f"{repo}:test_sft"} and len(set(splits.hashes.values())) == 2
    with pytest.raises(TunelabError, match=r"has no split 'test'; its splits are train_sft, test_sft: set data.eval_s"):
        load(repo, hub_split="train_sft", eval=str(repo), eval_split="test")


def test_a_dataset_repository_is_read_as_its_files_are_now(tmp_path: Path) -> None:
    """datasets 5.2 caches a local dataset repository under its folder's name and README: another folder of the same
    name, or the same folder after its data files changed, came back as the rows cached first."""
    import datasets

    def rows(text: str, n: int) -> list[dict]:
        return [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]}] * n

    first = dataset_repository(tmp_path / "a" / "chats", {"train": rows("first", 2)})
    other = dataset_repository(tmp_path / "b" / "chats", {"train": rows("other", 3)})
    assert load(first).train.rows == rows("first", 2)
    assert load(other).train.rows == rows("other", 3)
    shard = next((first / "data").glob("train-*.parquet"))
    datasets.Dataset.from_list(rows("edited", 4)).to_parquet(str(shard))
    assert load(first).train.rows == rows("edited", 4)


def test_a_split_may_be_sliced_as_datasets_slices_it(tmp_path: Path) -> None:
    """hub_split: train[:75%] and eval_split: train[75%:] of one dataset: the first rows to train, the rest held out
    (a slice is not the same split, so it is not refused as eval-of-train)."""
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(8)
    ]
    repo = dataset_repository(tmp_path / "repo", {"train": rows})
    splits = load(repo, hub_split="train[:75%]", eval=str(repo), eval_split="train[75%:]")
    assert (splits.train.rows, splits.eval.rows) == (rows[:6], rows[6:])


def test_eval_data_that_is_the_training_data_is_refused(tmp_path: Path) -> None:
    repo = dataset_repository(tmp_path / "repo", {"train": [CHAT], "test": [CHAT]})
    with pytest.raises(TunelabError, match=r"^data.eval: reads the same split of '.*repo' as data.train \('train'\)"):
        load(repo, eval=str(repo))
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(TunelabError, match=r"^data.eval: '.*d.jsonl' is also a training file"):
        load(path, eval=str(path))
    with pytest.raises(
        TunelabError, match=r"^data.eval_split: names a split of data.eval, which is a file \('.*d.jsonl'"
    ):
        load(repo, hub_split="train", eval=str(path), eval_split="test")
    with pytest.raises(TunelabError, match=r"^data.eval_split: names a split of data.eval, which is not set; remove"):
        load(repo, eval_split="test")


def test_folders_are_hashed_by_their_records(tmp_path: Path) -> None:
    """The same rows give the same digest however they are stored; one changed row changes it."""
    import datasets

    rows = [CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    repo = dataset_repository(tmp_path / "repo", {"train": rows})
    edited = dataset_repository(
        tmp_path / "edited", {"train": [CHAT, {"messages": rows[1]["messages"][:1] + [CHAT["messages"][1]]}]}
    )
    digests = [load(p).hashes[str(p)] for p in (tmp_path / "saved", repo, edited)]
    assert digests[0] == digests[1] != digests[2]
    assert all(len(d) == 16 and int(d, 16) >= 0 for d in digests)


def test_every_row_knows_where_it_came_from(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "o.jsonl", [CHAT, "", CHAT])
    split = load(path).train
    assert split.origins == [f"{path}:1", f"{path}:3"]


def test_unpaired_feedback_is_kto_data(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Name a fruit.", "completion": "Apple.", "label": True},
        {"prompt": "Name a fruit.", "completion": "A car.", "label": False},
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    splits = load(path, "kto")
    assert splits.format == "unpaired" and splits.train.rows == rows
    with pytest.raises(
        TunelabError, match=r"holds unpaired thumbs-up/down completions \(label\) but method is sft; set method: kto"
    ):
        load(path, "sft")
    with pytest.raises(TunelabError, match=r"kto.jsonl:1: 'label' must be true"):
        load(write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": "yes"}]), "kto")


@pytest.mark.parametrize("method", ["orpo", "simpo", "kto"])
def test_preference_methods_take_pairs(tmp_path: Path, method: str) -> None:
    assert load(DATA / "pref_train.jsonl", method).format == "preference"
    with pytest.raises(TunelabError, match=rf"holds messages data but method is {method}"):
        load(write_jsonl(tmp_path / "c.jsonl", [CHAT]), method)


def test_dolly_records_are_one_exchange_with_the_context_after_the_instruction(tmp_path: Path) -> None:
    """databricks-dolly-15k's shape: instruction, context, response (and a category nothing reads)."""
    rows = [
        {"instruction": "Name the capital.", "context": "Molo is a country.", "response": "Vevasmo.", "category": "qa"},
        {"instruction": "Say hi.", "context": "", "response": "Hi.", "category": "open_qa"},
    ]
    splits = load(write_jsonl(tmp_path / "dolly.jsonl", rows))
    assert splits.format == "alpaca"
    assert [r["messages"] for r in splits.train.rows] == [
        [
            {"role": "user", "content": "Name the capital.\n\nMolo is a country."},
            {"role": "assistant", "content": "Vevasmo."},
        ],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}],
    ]


def test_content_given_as_text_parts_is_the_text_they_hold(tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 plus 3?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "5."}]},
    ]
    rows = load(write_jsonl(tmp_path / "parts.jsonl", [{"messages": turns}])).train.rows
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5."},
    ]
    image = [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}, turns[1]]
    with pytest.raises(
        TunelabError, match=r"img.jsonl:1: messages\[0\].content\[0\] is a part of type 'image'; tunelab trains on text"
    ):
        load(write_jsonl(tmp_path / "img.jsonl", [{"messages": image}]))


def test_gzipped_files_read_as_their_inner_type_and_hash_as_stored(tmp_path: Path) -> None:
    import gzip
    import hashlib

    plain = write_jsonl(tmp_path / "d.jsonl", [CHAT, CHAT])
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    splits = load(packed)
    assert splits.train.rows == [CHAT, CHAT]
    assert splits.train.origins == [f"{packed}:1", f"{packed}:2"]
    assert splits.hashes[str(packed)] == hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    broken = tmp_path / "b.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(TunelabError, match=r"b.jsonl.gz: not a readable gzip file"):
        load(broken)


def test_a_saved_dataset_whose_messages_fill_absent_keys_with_null_reads_as_the_jsonl_does(tmp_path: Path) -> None:
    """Arrow gives every message every key any message has: weight, tool_calls, name... as null where absent."""
    import datasets

    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "weight": 0},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    datasets.Dataset.from_list([{"messages": turns}, CHAT]).save_to_disk(str(tmp_path / "saved"))
    rows = load(tmp_path / "saved").train.rows
    assert rows[0]["messages"] == [turns[0], turns[1], turns[2], turns[3]]
    assert rows[1] == CHAT


def test_as_chat_puts_plain_text_rows_into_the_chat_format(tmp_path: Path) -> None:
    user, reply = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    rows = [
        {"prompt": "Hi?", "completion": "Hello."},
        {"prompt": "Hi?", "completion": "Hello.", "system": "Be brief."},
        {"prompt": [user], "completion": [reply]},  # already a chat: as it is
    ]
    sft = load(write_jsonl(tmp_path / "s.jsonl", rows), as_chat=True).train.rows
    assert sft == [
        {"prompt": [user], "completion": [reply]},
        {"prompt": [{"role": "system", "content": "Be brief."}, user], "completion": [reply]},
        {"prompt": [user], "completion": [reply]},
    ]
    # truthy-dpo's shape (system, prompt, chosen, rejected as strings), and KTO's unpaired rows
    pairs = [{"system": "Be brief.", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}]
    pair = load(write_jsonl(tmp_path / "p.jsonl", pairs), method="dpo", as_chat=True).train.rows[0]
    assert pair == {
        "prompt": [{"role": "system", "content": "Be brief."}, user],
        "chosen": [reply],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    orca = [{"system": "Be brief.", "question": "Hi?", "chosen": "Hello.", "rejected": "Go away."}]  # orca_dpo_pairs
    assert load(write_jsonl(tmp_path / "o.jsonl", orca), method="dpo", as_chat=True).train.rows == [pair]
    thumbs = [{"prompt": "Hi?", "completion": "Hello.", "label": True}]
    assert load(write_jsonl(tmp_path / "k.jsonl", thumbs), method="kto", as_chat=True).train.rows == [
        {"prompt": [user], "completion": [reply], "label": True}
    ]
    # A pair that mixes a string prompt with answers as messages (or the reverse) is one chat with as_chat ...
    mixed = [{"prompt": "Hi?", "chosen": [reply], "rejected": "Go away."}]
    assert load(write_jsonl(tmp_path / "m.jsonl", mixed), method="dpo", as_chat=True).train.rows == [
        {"prompt": [user], "chosen": [reply], "rejected": [{"role": "assistant", "content": "Go away."}]}
    ]
    # A prompt given as messages with string answers (SFT, DPO, KTO) likewise
    chat_prompt = {"prompt": [{"role": "system", "content": "Be brief."}, user]}
    for method, row in (
        ("sft", {"completion": "Hello."}),
        ("dpo", {"chosen": "Hello.", "rejected": [{"role": "assistant", "content": "Go away."}]}),
        ("kto", {"completion": "Hello.", "label": False}),
    ):
        path = write_jsonl(tmp_path / f"{method}-m.jsonl", [chat_prompt | row])
        as_turns = {k: [{"role": "assistant", "content": v}] if isinstance(v, str) else v for k, v in row.items()}
        assert load(path, method=method, as_chat=True).train.rows == [chat_prompt | as_turns]
        # ... and refused without it: TRL renders a row as a chat or as text, and would fail on half of it.
        with pytest.raises(TunelabError, match=rf"{method}-m.jsonl:1: mixes plain text and messages among prompt, "):
            load(path, method=method)
    with pytest.raises(TunelabError, match=r"m.jsonl:1: mixes plain text and messages among prompt, chosen, rej"):
        load(tmp_path / "m.jsonl", method="dpo")
    # Without as_chat the strings stay raw text, where a system text has no place: refused, not dropped.
    assert load(write_jsonl(tmp_path / "r.jsonl", rows[:1])).train.rows == rows[:1]
    with pytest.raises(TunelabError, match=r"p.jsonl:1: has a 'system' text, .*set data.as_chat: true"):
        load(tmp_path / "p.jsonl", method="dpo")
    with pytest.raises(TunelabError, match=r"b.jsonl:1: 'system' must be a string, got list"):
        load(write_jsonl(tmp_path / "b.jsonl", [rows[1] | {"system": ["x"]}]), as_chat=True)


def test_sft_files_of_different_shapes_train_together_and_preference_files_must_agree(tmp_path: Path) -> None:
    chats = write_jsonl(tmp_path / "chats.jsonl", [CHAT])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "hi", "input": "", "output": "hello"}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    splits = load_splits(DataSettings(train=[str(chats), str(alpaca)], eval=str(held)), "sft", seed=0)
    assert (splits.format, splits.train.rows, splits.eval.rows) == (
        "messages+alpaca+prompt_completion",
        [CHAT, CHAT],
        [{"prompt": "2+2=", "completion": "4"}],
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(TunelabError, match=r"holds preference rows \(chosen/rejected\) and '.*thumbs.jsonl' unpaired"):
        load_splits(DataSettings(train=[str(pairs), str(thumbs)]), "kto", seed=0)
    assert load_splits(DataSettings(train=[str(pairs), str(pairs)]), "dpo", seed=0).format == "preference"


def test_columns_rename_a_datasets_fields_to_the_ones_tunelab_reads(tmp_path: Path) -> None:
    """openai/gsm8k's question/answer, which no format names, read as prompt/completion (and as_chat makes them a
    chat); a field the data lacks, or a rename onto a field it has, is one line naming the fields."""
    from pydantic import ValidationError

    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    with pytest.raises(TunelabError, match=r"from fields \['answer', 'question'\]; .* rename yours with data.columns"):
        load(gsm8k)
    columns = {"question": "prompt", "answer": "completion"}
    assert load(gsm8k, columns=columns).train.rows == [{"prompt": "2+2?", "completion": "2+2=4\n#### 4"}]
    assert load(gsm8k, columns=columns, as_chat=True).train.rows == [
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "completion": [{"role": "assistant", "content": "2+2=4\n#### 4"}],
        }
    ]
    with pytest.raises(
        TunelabError, match=r"^data.columns: 'query' is not a field of .*gsm8k.jsonl \(its fields: answer, q"
    ):
        load(gsm8k, columns={"query": "prompt", "answer": "completion"})
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "question": "2+2?", "answer": "4"}])
    with pytest.raises(TunelabError, match=r"has a 'prompt' field already, so 'question' cannot be renamed to it"):
        load(both, columns=columns)
    swapped = load(gsm8k, columns={"question": "completion", "answer": "prompt"}).train.rows
    assert swapped == [{"prompt": "2+2=4\n#### 4", "completion": "2+2?"}]
    with pytest.raises(ValidationError, match="columns.question"):
        DataSettings(train="x.jsonl", columns={"question": "query"})


def test_a_dataset_with_an_image_column_hashes_the_same_on_every_read(tmp_path: Path) -> None:
    """datasets decodes an image column to PIL images, whose str() holds a memory address: the digest reads their
    pixels, so a rerun sees the same data and one changed pixel is a change."""
    import datasets
    from PIL import Image

    from tunelab.data import read_records

    def saved(name: str, pixel: int) -> str:
        image = Image.new("RGB", (4, 4), (pixel, 0, 0))
        features = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()})
        datasets.Dataset.from_list([{"text": "a caption", "image": image}], features=features).save_to_disk(
            str(tmp_path / name)
        )
        return str(tmp_path / name)

    first, again = read_records(saved("a", 10), "data.train"), read_records(str(tmp_path / "a"), "data.train")
    assert type(first[0][0].value["image"]).__module__.startswith("PIL")  # decoded images, both alive at once
    assert first[1] == again[1] != read_records(saved("b", 11), "data.train")[1]


def test_conversations_in_csv_cells_are_read_as_conversations(tmp_path: Path) -> None:
    """A CSV of chats holds each conversation as text: JSON, or the Python repr pandas' to_csv writes for a column of
    lists. Cells that hold messages are read as messages, KTO's True/False as booleans; other text stays text."""
    import csv

    user, reply = {"role": "user", "content": "hi, [1]"}, {"role": "assistant", "content": "hello"}
    path = tmp_path / "chats.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages", "note"])
        writer.writerow([json.dumps([user, reply]), "[not json"])
        writer.writerow([repr([user, reply]), "[1, 2]"])
    assert load(path).train.rows == [{"messages": [user, reply]}] * 2
    thumbs = tmp_path / "thumbs.csv"
    thumbs.write_text('prompt,completion,label\n"[1, 2]",three,True\nq,a,false\n')
    assert load(thumbs, method="kto").train.rows == [
        {"prompt": "[1, 2]", "completion": "three", "label": True},
        {"prompt": "q", "completion": "a", "label": False},
    ]


def numbered_chats(n: int, tag: str = "q") -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]


def asked(rows: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in rows]


def test_a_source_may_give_a_seeded_sample_of_its_rows(tmp_path: Path) -> None:
    """rows: N draws N rows with train.seed, in the file's order; a larger sample holds every row of a smaller one
    (a ladder over the data size adds rows, it does not swap them); another seed draws others."""
    path = write_jsonl(tmp_path / "d.jsonl", numbered_chats(40))
    every = asked(load(path).train.rows)

    def sample(seed: int, **part) -> list[str]:
        settings = DataSettings(train={"path": str(path), **part})
        return asked(load_splits(settings, "sft", seed=seed).train.rows)

    ten, twenty = sample(0, rows=10), sample(0, rows=20)
    assert len(ten) == 10 and len(set(ten)) == 10 and set(ten) <= set(twenty) <= set(every)
    assert ten == sorted(ten, key=every.index)  # the file's order
    assert sample(0, rows=10) == ten and sample(1, rows=10) != ten
    assert sample(0, fraction=0.25) == ten  # 25% of 40, the same draw
    splits = load_splits(DataSettings(train={"path": str(path), "rows": 10}), "sft", seed=0)
    assert splits.train.sampled and splits.train.source == f"{path} (10 of 40 rows, sampled)"
    assert splits.sampled_from() == f"train from {path} (10 of 40 rows, sampled)"  # plan's line, the manifest's
    assert load(path).sampled_from() is None
    assert splits.train.origins == [f"{path}:{every.index(q) + 1}" for q in ten]
    assert splits.hashes == load(path).hashes  # the digest is the file's: the sample is the config's (rows, seed)


def test_sources_of_different_shapes_mix_each_with_its_own_part_and_field_names(tmp_path: Path) -> None:
    """data.columns renames the fields of every source that names no columns of its own."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": f"q{i}", "completion": f"a{i}"} for i in range(30)])
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"g{i}", "answer": f"{i}"} for i in range(8)])
    chats = write_jsonl(tmp_path / "chats.jsonl", numbered_chats(3, "c"))
    settings = DataSettings(
        train=[
            {"path": str(qa), "rows": 12},
            {"path": str(gsm), "columns": {"question": "prompt", "answer": "completion"}},
            {"path": str(chats), "columns": {}},
        ],
        eval={"path": str(write_jsonl(tmp_path / "eval.jsonl", numbered_chats(50, "e"))), "rows": 5, "columns": {}},
        columns={"query": "prompt"},
    )
    splits = load_splits(settings, "sft", seed=3)
    assert splits.format == "prompt_completion+messages"
    assert len(splits.train.rows) == 12 + 8 + 3 and all(r["prompt"].startswith("q") for r in splits.train.rows[:12])
    assert splits.train.rows[12:20] == [{"prompt": f"g{i}", "completion": f"{i}"} for i in range(8)]
    assert splits.train.rows[20:] == numbered_chats(3, "c")
    assert len(splits.eval.rows) == 5 and splits.eval.sampled
    assert splits.train.source == f"{qa} (12 of 30 rows, sampled), {gsm}, {chats}"
    settings.train[2].columns = None  # data.columns then applies to the chats, which have no 'query'
    with pytest.raises(TunelabError, match=r"^data.columns: 'query' is not a field of .*chats.jsonl"):
        load_splits(settings, "sft", seed=3)
    settings.train[1].columns = {"problem": "prompt"}
    with pytest.raises(TunelabError, match=r"^data.train\[1\].columns: 'problem' is not a field of .*gsm.jsonl"):
        load_splits(settings, "sft", seed=3)


def test_a_source_of_its_own_split_reads_that_split_and_names_its_key_when_missing(tmp_path: Path) -> None:
    repo = dataset_repository(
        tmp_path / "ultrachat", {"train_sft": numbered_chats(6), "test_sft": numbered_chats(9, "t")}
    )
    settings = DataSettings(
        train={"path": str(repo), "split": "train_sft"}, eval={"path": str(repo), "split": "test_sft", "rows": 4}
    )
    splits = load_splits(settings, "sft", seed=0)
    assert asked(splits.train.rows) == [f"q{i}" for i in range(6)]
    assert len(splits.eval.rows) == 4 and set(asked(splits.eval.rows)) <= {f"t{i}" for i in range(9)}
    # a further held-out set of the same dataset reads data.eval_split by default, as data.eval does
    also = DataSettings(
        train={"path": str(repo), "split": "train_sft"},
        eval_split="test_sft",
        eval=str(repo),
        eval_also={"more": str(repo)},
    )
    assert asked(load_splits(also, "sft", seed=0).also["more"].rows) == [f"t{i}" for i in range(9)]
    with pytest.raises(
        TunelabError, match=r"has no split 'tran_sft'; its splits are train_sft, test_sft: set data.train.split"
    ):
        load_splits(DataSettings(train={"path": str(repo), "split": "tran_sft"}), "sft", seed=0)
    with pytest.raises(
        TunelabError, match=r"^data.eval: reads the same split of '.*ultrachat' as data.train \('train_sft'\)"
    ):
        load_splits(
            DataSettings(
                train={"path": str(repo), "split": "train_sft"},
                eval={"path": str(repo), "split": "train_sft", "rows": 2},
            ),
            "sft",
            seed=0,
        )


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        ({"rows": 41}, r"^data.train.rows: 41 asks for more rows than '.*d.jsonl' holds \(40\); lower it"),
        ([{"rows": 2}, {"rows": 41}], r"^data.train\[1\].rows: 41 asks for more rows"),
        ({"split": "test"}, r"^data.train.split: '.*d.jsonl' is a file and has no splits; remove split$"),
    ],
)
def test_a_sample_a_source_cannot_give_is_one_line_naming_the_key(tmp_path: Path, train, expected: str) -> None:
    path = str(write_jsonl(tmp_path / "d.jsonl", numbered_chats(40)))
    given = [{"path": path, **t} for t in train] if isinstance(train, list) else {"path": path, **train}
    with pytest.raises(TunelabError, match=expected):
        load_splits(DataSettings(train=given), "sft", seed=0)


def subsets_repository(folder: Path) -> Path:
    """A dataset repository with two subsets (configs), main and socratic, each with train and test splits: the
    layout of openai/gsm8k."""
    import datasets

    configs = ""
    for subset in ("main", "socratic"):
        (folder / subset).mkdir(parents=True)
        configs += f"- config_name: {subset}\n  data_files:\n"
        for split in ("train", "test"):
            rows = [{"question": f"{subset} {split} q{i}", "answer": f"{i}"} for i in range(6)]
            datasets.Dataset.from_list(rows).to_parquet(str(folder / subset / f"{split}-00000-of-00001.parquet"))
            configs += f"  - split: {split}\n    path: {subset}/{split}-*\n"
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return folder


def test_a_dataset_of_several_subsets_reads_the_one_named(tmp_path: Path) -> None:
    from tunelab.starter import write_starter

    repo = str(subsets_repository(tmp_path / "gsm8k"))
    columns = {"question": "prompt", "answer": "completion"}
    with pytest.raises(TunelabError) as missing:
        load_splits(DataSettings(train=repo, columns=columns), "sft", seed=0)
    assert str(missing.value) == f"{repo}: has several subsets; its subsets are main, socratic: set data.subset"
    with pytest.raises(TunelabError, match=r"has no subset 'mian'; its subsets are main, socratic: set data.subset$"):
        load_splits(DataSettings(train=repo, columns=columns, subset="mian"), "sft", seed=0)
    splits = load_splits(
        DataSettings(train=repo, subset="main", columns=columns, eval=repo, eval_split="test"), "sft", 0
    )
    assert [r["prompt"] for r in splits.train.rows] == [f"main train q{i}" for i in range(6)]
    assert [r["prompt"] for r in splits.eval.rows] == [f"main test q{i}" for i in range(6)]
    # a mixture of both subsets: each source names its own, and the manifest keeps a digest for each
    both = [{"path": repo, "subset": "main"}, {"path": repo, "subset": "socratic", "rows": 2}]
    mixed = load_splits(DataSettings(train=both, columns=columns), "sft", seed=0)
    assert len(mixed.train.rows) == 8 and mixed.train.rows[-1]["prompt"].startswith("socratic train")
    assert set(mixed.hashes) == {f"{repo}[main]", f"{repo}[socratic]"} and len(set(mixed.hashes.values())) == 2
    # tunelab init: the subset is asked for, then written
    with pytest.raises(
        TunelabError, match=r"^--data: '.*gsm8k' has several subsets; its subsets are main, socratic; give"
    ):
        write_starter(tmp_path / "a.yaml", "builtin:tiny-chat", repo, None, "qv", None, None, columns=columns)
    starter = write_starter(
        tmp_path / "b.yaml", "builtin:tiny-chat", repo, None, "qv", None, None, columns=columns, subset="socratic"
    )
    assert starter.exp.data.subset == "socratic" and starter.exp.data.eval_split == "test"


def test_grpo_prompts_keep_the_fields_the_rewards_read(tmp_path: Path) -> None:
    """GRPO's rows are a prompt and whatever else the row holds, as it is: TRL hands those fields to the rewards.
    data.as_chat makes the prompt a user turn and leaves the other fields (an answer to check against) as text."""
    row = {"prompt": "2+2?", "answer": "4", "meta": {"level": 1}, "completion": "four"}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    loaded = load(path, method="grpo")
    assert loaded.format == "prompt" and loaded.train.rows == [row]
    chat = load(path, method="grpo", as_chat=True).train.rows
    assert chat == [row | {"prompt": [{"role": "user", "content": "2+2?"}]}]
    ends = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(TunelabError, match=r"e.jsonl:1: the prompt ends with an assistant turn"):
        load(write_jsonl(tmp_path / "e.jsonl", [ends]), method="grpo")
    with pytest.raises(TunelabError, match="holds prompts without answers but method is sft; set method: grpo"):
        load(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "level": 2}]))
    with pytest.raises(TunelabError, match="holds preference pairs .* but method is grpo"):
        load(DATA / "pref_train.jsonl", method="grpo", format="preference")
