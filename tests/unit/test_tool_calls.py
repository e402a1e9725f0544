"""Tool-calling and reasoning chats in OpenAI's data shape: read whole (nothing silently dropped), rendered by the
model's own template with the row's tools, and supervised on the assistant's calls and answers only."""

import json
import re
from pathlib import Path

import pytest

from tests.chat_fixtures import supervised_replies, trl_tokenizer
from tunelab.config import DataSettings
from tunelab.data import load_splits
from tunelab.errors import TunelabError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_capital",
            "description": "The capital of a country",
            "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_capital", "arguments": '{"country": "Molo"}'}}
OPENAI_ROW = {  # as OpenAI's chat fine-tuning files hold it: arguments and tools as JSON text, content null
    "tools": json.dumps(TOOLS),
    "messages": [
        {"role": "user", "content": "What is the capital of Molo?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_capital", "content": "Vevasmo"},
        {"role": "assistant", "content": "The capital of Molo is Vevasmo."},
    ],
}


def load_rows(tmp_path: Path, rows: list[dict]) -> list[dict]:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_splits(DataSettings(train=str(path)), "sft", seed=0).train.rows


def test_openai_tool_calls_are_read_whole(tmp_path: Path) -> None:
    (row,) = load_rows(tmp_path, [OPENAI_ROW])
    assert row["tools"] == TOOLS
    call, result = row["messages"][1], row["messages"][2]
    assert call == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_capital", "arguments": {"country": "Molo"}}, "id": "call_1"}
        ],
    }
    assert result == {"role": "tool", "content": "Vevasmo", "name": "get_capital", "tool_call_id": "call_1"}


def test_reasoning_is_kept_on_assistant_turns(tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": "2 plus 3?"},
        {"role": "assistant", "content": "5.", "reasoning_content": "2 and 3 make 5."},
    ]
    (row,) = load_rows(tmp_path, [{"messages": turns}])
    assert row["messages"][1] == {"role": "assistant", "content": "5.", "reasoning_content": "2 and 3 make 5."}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["messages"][0].update(tool_calls=[CALL]),
            r"tools.jsonl:1: messages\[0\].tool_calls must be a list, on assistant messages",
        ),
        (
            lambda r: r["messages"][1].update(tool_calls=[{"type": "function", "function": {"arguments": "{}"}}]),
            r'tools.jsonl:1: messages\[1\].tool_calls\[0\] must be \{"type": "function", "function": \{"name"',
        ),
        (
            lambda r: r["messages"][1].update(
                tool_calls=[{"function": {"name": "get_capital", "arguments": "{country: Molo}"}}]
            ),
            r"tools.jsonl:1: messages\[1\].tool_calls\[0\].function.arguments is not valid JSON",
        ),
        (lambda r: r.update(tools="[{oops"), r"tools.jsonl:1: 'tools' is not valid JSON"),
        (lambda r: r.update(tools={"name": "x"}), r"tools.jsonl:1: 'tools' must be a list of tool definitions"),
        (
            lambda r: r["messages"][0].update(reasoning_content="hm"),
            r"tools.jsonl:1: messages\[0\].reasoning_content must be a string, on assistant messages",
        ),
    ],
)
def test_malformed_tool_data_is_one_line_at_its_record(tmp_path: Path, change, message: str) -> None:
    row = json.loads(json.dumps(OPENAI_ROW))
    change(row)
    with pytest.raises(TunelabError, match=message) as e:
        load_rows(tmp_path, [row])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("template", "supervised"),
    [
        # Llama 3.1 prints the tools into the first user turn and a call as bare JSON with "parameters".
        (
            "llama3_1",
            [
                '{"name": "get_capital", "parameters": {"country": "Molo"}}<|eot_id|>',
                "The capital of Molo is Vevasmo.<|eot_id|>",
            ],
        ),
        # Qwen2.5 prints the tools into the system prompt and a call inside <tool_call> tags (a special token
        # in this tokenizer, so the call's own markers do not end the span).
        (
            "qwen2_5",
            [
                '<tool_call>\n{"name": "get_capital", "arguments": {"country": "Molo"}}\n</tool_call><|im_end|>',
                "The capital of Molo is Vevasmo.<|im_end|>",
            ],
        ),
    ],
)
def test_calls_and_answers_carry_loss_and_tool_results_do_not(tmp_path: Path, template: str, supervised) -> None:
    from tunelab.templates import tokenize_example

    tok = trl_tokenizer(template, extra=("<tool_call>", "</tool_call>"))
    (row,) = load_rows(tmp_path, [OPENAI_ROW])
    assert supervised_replies(tok, row) == supervised
    text = tok.decode(tokenize_example(tok, row).input_ids)
    assert "get_capital" in text.split("<tool_call>")[0]  # the template printed the tool definitions
    assert "Vevasmo" in text.split(supervised[0])[1].split(supervised[1])[0]  # the tool result, unsupervised


def test_qwen3_reasoning_is_supervised_inside_its_think_block(tmp_path: Path) -> None:
    tok = trl_tokenizer("qwen3")
    turns = [
        {"role": "user", "content": "2 plus 3?"},
        {"role": "assistant", "content": "5.", "reasoning_content": "2 and 3 make 5."},
    ]
    (row,) = load_rows(tmp_path, [{"messages": turns}])
    assert supervised_replies(tok, row) == ["<think>\n2 and 3 make 5.\n</think>\n\n5.<|im_end|>\n"]


def test_llama_factory_sharegpt_tool_turns_become_openai_tool_calls(tmp_path: Path) -> None:
    """LLaMA-Factory's ShareGPT shape (glaive_toolcall and the like): function_call and observation turns, tools as
    JSON text on the record."""
    record = {
        "tools": json.dumps([TOOLS[0]["function"]]),
        "conversations": [
            {"from": "human", "value": "What is the capital of Molo?"},
            {"from": "function_call", "value": '{"name": "get_capital", "arguments": {"country": "Molo"}}'},
            {"from": "observation", "value": "Vevasmo"},
            {"from": "gpt", "value": "The capital of Molo is Vevasmo."},
        ],
    }
    (row,) = load_rows(tmp_path, [record])
    assert row["tools"] == [TOOLS[0]["function"]]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert row["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_capital", "arguments": {"country": "Molo"}}}
    ]
    assert row["messages"][2] == {"role": "tool", "content": "Vevasmo"}
    record["conversations"][1]["value"] = "get_capital(Molo)"
    with pytest.raises(TunelabError, match=r"tools.jsonl:1: conversations\[1\] \(function_call\) is not valid JSON"):
        load_rows(tmp_path, [record])


def test_named_templates_render_tool_rows_with_tool_use_and_others_with_default(tmp_path: Path) -> None:
    """Tokenizers that ship several named templates (Hermes 2 Pro, Command R: {"default": ..., "tool_use": ...}):
    as Transformers picks, rows with tools render through tool_use, the rest through default."""
    from tunelab.templates import template_hash, tokenize_example

    tok = trl_tokenizer("qwen2_5", extra=("<tool_call>", "</tool_call>"))
    tool_use = tok.chat_template
    default = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" + (
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.chat_template = {"default": default, "tool_use": tool_use}
    (with_tools,) = load_rows(tmp_path, [OPENAI_ROW])
    assert (
        '"name": "get_capital"' in tok.decode(tokenize_example(tok, with_tools).input_ids).split("<|im_start|>user")[0]
    )
    plain = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    assert supervised_replies(tok, plain) == ["Hello.<|im_end|>"]
    assert tok.decode(tokenize_example(tok, plain).input_ids).startswith("<|im_start|>user\nHi?")  # no system prompt
    assert template_hash(tok.chat_template) not in (template_hash(default), template_hash(tool_use), None)


def test_preference_and_thumbs_rows_carry_their_tools(tmp_path: Path) -> None:
    """A pair (or a thumbs-up/down completion) keeps the tool definitions its conversation was shown, and an answer
    that only calls a tool is an answer; tools beside a plain-text prompt have nowhere to be printed."""
    messages = OPENAI_ROW["messages"]
    pair = {"prompt": messages[:1], "chosen": messages[1:2], "rejected": [messages[3]], "tools": json.dumps(TOOLS)}
    thumbs = {"prompt": messages[:1], "completion": messages[1:2], "label": True, "tools": TOOLS}
    path = tmp_path / "pairs.jsonl"
    for method, record, answer in (("dpo", pair, "chosen"), ("kto", thumbs, "completion")):
        path.write_text(json.dumps(record) + "\n")
        (row,) = load_splits(DataSettings(train=str(path)), method, seed=0).train.rows
        assert row["tools"] == TOOLS
        assert row[answer][0]["tool_calls"][0]["function"] == {"name": "get_capital", "arguments": {"country": "Molo"}}
        path.write_text(json.dumps(record | {"tools": []}) + "\n")  # an empty field (as datasets fill one) is none
        assert "tools" not in load_splits(DataSettings(train=str(path)), method, seed=0).train.rows[0]
    path.write_text(
        json.dumps({"prompt": "Capital of Molo?", "chosen": "Vevasmo.", "rejected": "Paris.", "tools": TOOLS})
    )
    with pytest.raises(TunelabError, match=r"pairs.jsonl:1: 'tools' needs a conversation .* give prompt, chosen and "):
        load_splits(DataSettings(train=str(path)), "dpo", seed=0)


def test_rows_reach_a_trainer_as_they_were_read() -> None:
    """The Dataset a TRL trainer is given holds each row as it was: the fields only later rows have, and each
    tool call's own arguments (Arrow would give every call the others' keys, null, and a template prints them)."""
    from tunelab.methods.common import rows_dataset

    def call(name: str, **arguments) -> list[dict]:
        function = {"name": name, "arguments": arguments}
        return [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}]

    rows = [
        {"prompt": "42", "chosen": "Yes.", "score": 1},
        {"prompt": [{"role": "user", "content": "Capital of Molo?"}], "chosen": call("get_capital", country="Molo")},
        {"prompt": [{"role": "user", "content": "Where?"}], "chosen": call("where", city="Vevasmo"), "tools": TOOLS},
    ]
    dataset = rows_dataset(rows)
    assert dataset.column_names == ["prompt", "chosen", "score", "tools"]
    assert dataset.to_list() == [{"score": None, "tools": None} | row for row in rows]
    assert dataset[2]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Vevasmo"}


def test_prompt_completion_conversations_carry_their_tools(tmp_path: Path) -> None:
    from tunelab.templates import tokenize_example

    messages = OPENAI_ROW["messages"]
    record = {"prompt": messages[:1], "completion": messages[1:], "tools": TOOLS}
    (row,) = load_rows(tmp_path, [record])
    assert row["tools"] == TOOLS
    tok = trl_tokenizer("llama3_1")
    assert '"name": "get_capital"' in tok.decode(tokenize_example(tok, row).input_ids)
    with pytest.raises(TunelabError, match=r"tools.jsonl:1: 'tools' needs a conversation to print them into"):
        load_rows(tmp_path, [{"prompt": "Capital of Molo?", "completion": "Vevasmo.", "tools": TOOLS}])


def test_preference_accuracy_scores_each_answer_after_the_tools_it_was_shown(tmp_path: Path) -> None:
    """Held-out pairs are ranked on the conversation the trainer sees: the tool definitions printed (Llama 3.1: into
    the first user turn), the answer's own tokens (a call) the ones scored."""
    from tunelab.methods.preference import answer_tokens

    messages = OPENAI_ROW["messages"]
    record = {"prompt": messages[:1], "chosen": messages[1:2], "rejected": [messages[3]], "tools": TOOLS}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (row,) = load_splits(DataSettings(train=str(path)), "dpo", seed=0).train.rows
    tok = trl_tokenizer("llama3_1")
    for answer in ("chosen", "rejected"):
        tokens = answer_tokens(tok, row, answer)
        whole = tok.apply_chat_template(row["prompt"] + row[answer], tools=TOOLS, tokenize=False)
        assert tok.decode(tokens.input_ids) == whole
    scored = answer_tokens(tok, row, "chosen")
    assert tok.decode([t for t, m in zip(scored.input_ids, scored.loss_mask, strict=True) if m]) == (
        '{"name": "get_capital", "parameters": {"country": "Molo"}}<|eot_id|>'
    )


CALLS_REFUSED = "an assistant turn calls tools (tool_calls), but the chat template does not print tool calls"
RESULTS_REFUSED = "the conversation holds tool results (role tool), but the chat template does not print them"
TOOLS_REFUSED = "the row describes tools ('tools'), but the chat template does not print tool definitions"
# Hermes' shape (NousResearch/hermes-function-calling-v1): the call written into the reply, the result a tool turn
HERMES_ROW = {
    "messages": [
        {"role": "user", "content": "What is the capital of Molo?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_capital", "arguments": {"country": "Molo"}}\n</tool_call>',
        },
        {"role": "tool", "content": "Vevasmo"},
        {"role": "assistant", "content": "The capital of Molo is Vevasmo."},
    ]
}


@pytest.mark.parametrize(
    ("template", "refused", "hermes"),
    [
        ("llama3_1", None, None),
        ("qwen2_5", None, None),
        ("qwen3", None, None),
        # Llama 3's template prints only a message's content, whatever its role: a call would train as an empty
        # reply; a call written into the reply, and its result, train as they are
        ("llama3", CALLS_REFUSED, None),
        # Phi-3's prints no tool turn either
        ("phi3", CALLS_REFUSED, RESULTS_REFUSED),
        # DeepSeek-R1's distills print a call only where the turn's content is null; it is read as "", as TRL reads it
        ("deepseek_r1_distill", CALLS_REFUSED, None),
        # DeepSeek-V3's prints calls (its training version, which the masks come from) but never the definitions
        ("deepseekv3", TOOLS_REFUSED, None),
    ],
)
def test_tool_rows_are_refused_where_the_template_would_drop_the_calls_or_the_tools(
    tmp_path: Path, template: str, refused: str | None, hermes: str | None
) -> None:
    """Before, these trained: a call as `<|assistant|>\\n<|end|>` (Phi-3), tools the prompt never showed."""
    from tunelab.templates import encode

    tok = trl_tokenizer(template, extra=("<tool_call>", "</tool_call>"))
    plain = {"messages": OPENAI_ROW["messages"][:1] + [{"role": "assistant", "content": "Hi."}]}
    rows = load_rows(tmp_path, [plain, OPENAI_ROW])
    origins = [f"{tmp_path / 'tools.jsonl'}:{i}" for i in (1, 2)]
    if refused is None:
        encoded = encode(tok, rows, origins)
        assert "get_capital" in tok.decode(encoded.examples[1].input_ids)
    else:
        with pytest.raises(TunelabError) as e:
            encode(tok, rows, origins)
        assert str(e.value).startswith(f"{origins[1]}: {refused}") and "\n" not in str(e.value)
        assert "tokenizer.chat_template" in str(e.value)
    # a row that only describes the tools is refused where the template prints no definitions
    described = load_rows(tmp_path, [{"tools": TOOLS, "messages": rows[0]["messages"]}])
    if template in ("llama3", "phi3", "deepseekv3"):
        with pytest.raises(TunelabError, match=r"does not print tool definitions"):
            encode(tok, described, origins[:1])
    # Hermes' rows need the tool turns printed, not structured calls
    written = load_rows(tmp_path, [HERMES_ROW])
    if hermes is None:
        assert "Vevasmo" in tok.decode(encode(tok, written, origins[:1]).examples[0].input_ids).split("</tool_call>")[1]
    else:
        with pytest.raises(TunelabError, match=re.escape(hermes)):
            encode(tok, written, origins[:1])


def test_mistrals_refusal_of_openai_call_ids_names_the_ids_it_takes(tmp_path: Path) -> None:
    """Mistral v0.3's template (tests/fixtures/chat_models) refuses OpenAI's `call_1` ids; the line says what it
    takes, and a row with such ids trains."""
    from tunelab.templates import encode

    tok = trl_tokenizer("llama3_1")
    tok.chat_template = (Path(__file__).parents[1] / "fixtures/chat_models/mistral-7b-instruct-v0.3.jinja").read_text()
    origin = f"{tmp_path / 'tools.jsonl'}:1"
    with pytest.raises(TunelabError) as e:
        encode(tok, load_rows(tmp_path, [OPENAI_ROW]), [origin])
    assert str(e.value).startswith(f"{origin}: the chat template refused this conversation: Tool call IDs should be")
    assert str(e.value).endswith(
        "give each tool call an id of 9 letters and digits, and the tool message that answers it the same "
        "tool_call_id, as Mistral's format has them"
    )
    fixed = json.loads(json.dumps(OPENAI_ROW).replace('"call_1"', '"a1b2c3d4e"'))
    encoded = encode(tok, load_rows(tmp_path, [fixed]), [origin])
    assert '"id": "a1b2c3d4e"' in tok.decode(encoded.examples[0].input_ids)
