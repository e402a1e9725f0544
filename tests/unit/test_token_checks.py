"""What templates.py decides about tokens, on tokenizers small enough to work out by hand: which pad it chooses,
which warnings plan prints, how the loss mask is shown, and which turns a {% generation %} template supervises."""

from pathlib import Path

import pytest

from tests.chat_fixtures import supervised_replies, trl_tokenizer
from tunelab.errors import TunelabError
from tunelab.templates import (
    TokenChecks,
    Tokenized,
    choose_pad,
    loss_segments,
    resolve_template,
    text_parts,
    tokenize_example,
)


def word_tokenizer(reserved: tuple[str, ...] = ("<|reserved_9|>", "<|reserved_10|>")):
    """Whole words as tokens (ids: [UNK] 0, a 1, b 2, </s> 3), no pad token, then `reserved` as ids 4, 5, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": list(reserved)})
    return tok


def tiny_tokenizer(model_dir: Path, template: str):
    """The built-in model's tokenizer (Llama-3 special tokens) with `template` as its chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    return tok


def supervised_text(tok, t: Tokenized) -> str:
    return tok.decode([i for i, m in zip(t.input_ids, t.loss_mask, strict=True) if m])


def test_the_pad_is_the_lowest_id_reserved_token_that_no_turn_ends_with() -> None:
    # by id, reserved_9 (4) comes before reserved_10 (5); as text it would not
    assert choose_pad(word_tokenizer(), set())[0] == "<|reserved_9|>"
    tok = word_tokenizer()
    assert choose_pad(tok, {4}) == ("<|reserved_10|>", "chosen by tunelab: the tokenizer has no pad token")
    assert tok.pad_token == "<|reserved_10|>"


def test_a_tokenizer_with_its_own_pad_keeps_it() -> None:
    tok = word_tokenizer()
    tok.pad_token = "a"
    assert choose_pad(tok, {1}) == ("a", "the tokenizer's own")


def test_no_safe_pad_is_one_error_that_says_what_to_set() -> None:
    with pytest.raises(TunelabError) as error:
        choose_pad(word_tokenizer(reserved=("<|reserved_0|>",)), {4})
    assert str(error.value) == (
        "tokenizer.pad_token: the tokenizer has no pad token and none of its tokens is a safe choice "
        "(padding with EOS or the turn terminator would hide it from the loss); set tokenizer.pad_token to an "
        "unused token of its vocabulary"
    )


def test_plan_warnings_name_the_rows_and_the_fix() -> None:
    checks = TokenChecks(
        terminator="</s>",
        terminator_is_eos=True,
        pad_token="<|reserved_9|>",
        pad_source="chosen",
        rows_without_loss=["train.jsonl:1", "train.jsonl:2", "train.jsonl:3", "train.jsonl:9"],
        rows_all_loss=["train.jsonl:4"],
        rows_unterminated=["eval.jsonl:2"],
    )
    assert checks.warnings(64) == [
        "4 rows carry no loss within train.max_length=64 and will be dropped (train.jsonl:1, train.jsonl:2, "
        "train.jsonl:3, ...); raise train.max_length or fix those rows",
        "1 chat rows carry loss on every token, prompt included (train.jsonl:4); check the chat template",
        "1 rows have assistant turns that no special token closes (eval.jsonl:2), so the model may not learn to "
        "stop; use a template that ends each turn with a special token (tokenizer.chat_template)",
    ]
    assert TokenChecks("</s>", True, "a", "own", [], [], []).warnings(64) == []


def test_the_loss_mask_is_shown_as_runs_of_text() -> None:
    tok = word_tokenizer()
    example = Tokenized([1, 2, 2, 3, 1], [0, 1, 1, 1, 0])
    assert loss_segments(tok, example) == [("a", False), ("b b </s>", True), ("a", False)]
    assert loss_segments(tok, Tokenized([], [])) == []


def test_a_template_file_is_read_as_written(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    assert resolve_template(str(tmp_path / "t.jinja"), word_tokenizer()) == "{{ messages[0].content }}"
    with pytest.raises(TunelabError, match=r"^tokenizer.chat_template: template file '.*nope.jinja' not found$"):
        resolve_template(str(tmp_path / "nope.jinja"), word_tokenizer())


# A template that marks what the assistant says with {% generation %}, as TRL's training templates do.
MARKED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize(("weights", "supervised"), [((0, 1), " d<|eot_id|>"), ((1, 0), " b<|eot_id|>")])
def test_a_generation_template_supervises_exactly_the_turns_of_weight_one(
    tiny_model_dir, weights: tuple[int, int], supervised: str
) -> None:
    """A turn of weight 0 loses its whole span, also when it is the last and runs to the end of the row."""
    tok = tiny_tokenizer(tiny_model_dir, MARKED)
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": " b", "weight": weights[0]},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": " d", "weight": weights[1]},
        ]
    }
    t = tokenize_example(tok, row)
    assert tok.decode(t.input_ids) == "user: a\n b<|eot_id|>user: c\n d<|eot_id|>"
    assert supervised_text(tok, t) == supervised
    assert t.terminators == [tok.convert_tokens_to_ids("<|eot_id|>")] and t.unterminated == 0


def test_plain_prompt_completion_ends_with_eos_or_says_it_is_unterminated() -> None:
    t = tokenize_example(word_tokenizer(), {"prompt": "a", "completion": " b b"})
    assert (t.input_ids, t.loss_mask, t.terminators, t.unterminated) == ([1, 2, 2, 3], [0, 1, 1, 1], [3], 0)
    no_eos = word_tokenizer()
    no_eos.eos_token = None
    t = tokenize_example(no_eos, {"prompt": "a", "completion": " b"})
    assert (t.input_ids, t.loss_mask, t.terminators, t.unterminated) == ([1, 2], [0, 1], [], 1)


def test_a_generation_span_without_a_special_token_is_counted_as_unterminated(tiny_model_dir) -> None:
    tok = tiny_tokenizer(
        tiny_model_dir, MARKED.replace("<|eot_id|>{% endgeneration %}", "{% endgeneration %}<|eot_id|>")
    )
    t = tokenize_example(tok, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b"}]})
    assert supervised_text(tok, t) == " b"
    assert (t.terminators, t.unterminated) == ([], 1)


def test_a_template_refusal_names_the_record_and_the_setting_that_fixes_it(tiny_model_dir) -> None:
    refuses_system = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}<|eot_id|>{% endfor %}"
    )
    tok = tiny_tokenizer(tiny_model_dir, refuses_system)
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}
    with pytest.raises(TunelabError) as error:
        tokenize_example(tok, row, where="train.jsonl:7")
    assert str(error.value) == (
        "train.jsonl:7: the chat template refused this conversation: System role not supported; set "
        "tokenizer.fold_system: true to put the system message at the start of the first user turn"
    )


def test_an_unknown_trl_template_lists_trls_training_templates() -> None:
    with pytest.raises(TunelabError) as error:
        resolve_template("trl:llama9", word_tokenizer())
    names = str(error.value).split("its training templates: ")[1].split(", ")
    assert {"trl:llama3_training", "trl:qwen3_training"} <= set(names)
    assert all(n.startswith("trl:") and n.endswith("_training") for n in names)


def test_a_preference_prompt_folds_its_system_message_as_sft_rows_do() -> None:
    from tunelab.templates import fold_preference

    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    row |= {
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    folded = fold_preference(row, True)
    assert folded["prompt"] == [{"role": "user", "content": "Be brief.\n\nHi"}]
    assert folded["chosen"] == row["chosen"] and fold_preference(row, False) == row


def test_a_builtin_template_is_the_shipped_file() -> None:
    from tunelab.templates import TEMPLATE_DIR

    assert resolve_template("builtin:llama3", word_tokenizer()) == (TEMPLATE_DIR / "llama3.jinja").read_text()


TWO_TURNS = [
    {"role": "user", "content": "Hi there?"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "Which city?"},
    {"role": "assistant", "content": "The capital is Vevasmo."},
]

REASONING = {  # TRL 1.16's copies of the originals, and the replies their training versions supervise
    "qwen3": ("qwen3_training", "<think>\n\n</think>\n\n{}<|im_end|>\n"),
    "qwen3_5_think": ("qwen3_5_think_training", "<think>\n\n</think>\n\n{}<|im_end|>\n"),
    "nemotron_3_nano": ("nemotron_3_nano_training", "<think></think>{}<|im_end|>\n"),
    "deepseek_r1_distill": ("deepseek_r1_distill_training", "<｜Assistant｜>{}<｜end▁of▁sentence｜>"),
    # GLM-4.5 ends a reply with nothing of its own; the next turn's <|user|> is what stops generation
    "glm4moe": ("glm4moe_training", "\n<think></think>\n{}<|user|>"),
}


@pytest.mark.parametrize("name", list(REASONING))
def test_reasoning_templates_mask_through_trls_training_version(name: str) -> None:
    """Each renders an earlier reply differently once the conversation goes on; the masks come from TRL's training
    version (every reply, with the same think block), and the tokenizer keeps the model's own template."""
    from tunelab.templates import masking_template

    tok = trl_tokenizer(name)
    own = tok.chat_template
    training, reply = REASONING[name]
    assert masking_template(tok)[1] == training
    turns = TWO_TURNS
    assert supervised_replies(tok, {"messages": turns}) == [reply.format(m["content"]) for m in turns[1::2]]
    assert tok.chat_template == own


def test_gpt_oss_chats_with_reasoning_mask_through_trls_training_version() -> None:
    """gpt-oss's template drops an earlier reply's analysis once the conversation goes on (and ends the last reply
    with <|return|>): multi-turn chats whose replies carry `thinking` were refused. The masks come from TRL's training
    version, as TRL's SFTTrainer takes them: each reply where it sits, the last with its analysis."""
    from tunelab.templates import masking_template

    tok = trl_tokenizer("gptoss")
    assert masking_template(tok)[1] == "gptoss_training"
    turns = [
        {"role": "user", "content": "Hi there?"},
        {"role": "assistant", "content": "Hello!", "thinking": "Greet back."},
        {"role": "user", "content": "Which city?"},
        {"role": "assistant", "content": "Vevasmo.", "thinking": "Recall the capital."},
    ]
    final = "<|start|>assistant<|channel|>final<|message|>"
    assert supervised_replies(tok, {"messages": turns}) == [
        f"{final}Hello!<|end|>",
        f"<|start|>assistant<|channel|>analysis<|message|>Recall the capital.<|end|>{final}Vevasmo.<|return|>",
    ]
    assert "{% generation %}" not in tok.chat_template


def trl_originals() -> list[str]:
    """The models' own templates the installed TRL ships (its training versions aside)."""
    from tunelab.templates import trl_templates

    return sorted(p.stem for p in trl_templates().glob("*.jinja") if not p.stem.endswith("_training"))


@pytest.mark.parametrize("name", trl_originals())
def test_every_model_template_trl_ships_supervises_each_reply_and_nothing_the_user_said(name: str) -> None:
    """All the originals in the installed TRL (41 in 1.16: Cohere to Nemotron 3, Gemma 4, LFM2.5, Qwen3.8), on a
    two-turn chat: the loss covers each reply once, closed by the template's own end-of-turn token (and the newline
    after it, where the template prints one), and none of the user's words. A TRL upgrade that ships a template
    tunelab masks wrongly fails here by name."""
    tok = trl_tokenizer(name, extra=("<end_of_utterance>",))
    turns = TWO_TURNS
    spans = supervised_replies(tok, {"messages": turns})
    assert len(spans) == 2, spans
    for span, reply in zip(spans, ("Hello! How are you?", "The capital is Vevasmo."), strict=True):
        assert span.count(reply) == 1 and span.rstrip("\n").endswith(tuple(tok.all_special_tokens)), span
        assert "Hi there?" not in span and "Which city?" not in span


@pytest.mark.parametrize("name", ["llama3_1", "qwen2_5", "gemma3", "phi3_5"])
def test_prefix_consistent_templates_keep_their_own_masks(name: str) -> None:
    from tunelab.templates import masking_template

    tok = trl_tokenizer(name)
    assert masking_template(tok) == (tok.chat_template, None)


TEXT_PARTS = {  # TRL 1.16's copies of image-text templates that print a message's text only from text parts
    "idefics3": " {}<end_of_utterance>",  # Idefics3, and SmolVLM's own below
    "smolvlm": " {}<end_of_utterance>",
    "llava_next": " {}</s>",
}


@pytest.mark.parametrize("name", list(TEXT_PARTS))
def test_templates_that_print_only_text_parts_train_on_the_replies(name: str) -> None:
    """Rows arrive with string contents (text parts are joined when read); these templates printed an empty turn for
    each, so every reply trained as its closing marker alone. The contents now go to them as text parts."""
    from tunelab.templates import preference_as_template_reads

    tok = trl_tokenizer(name, extra=("<end_of_utterance>",))
    turns = TWO_TURNS
    assert supervised_replies(tok, {"messages": turns}) == [TEXT_PARTS[name].format(m["content"]) for m in turns[1::2]]
    # Preference rows go to TRL, which renders them with the tokenizer's template itself.
    pair = {"prompt": turns[:3], "chosen": turns[3:], "rejected": [{"role": "assistant", "content": "Elsewhere."}]}
    ready = preference_as_template_reads(pair, tok)

    def rendered(messages: list[dict]) -> str:
        try:
            return tok.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # LLaVA-NeXT's fails on string contents
            return repr(e)

    for answer, text in (("chosen", "The capital is Vevasmo."), ("rejected", "Elsewhere.")):
        assert text not in rendered(pair["prompt"] + pair[answer])
        assert text in rendered(ready["prompt"] + ready[answer])
    assert preference_as_template_reads(pair, trl_tokenizer("llama3_1")) is pair  # a template that prints strings


def test_a_template_kept_for_the_processor_alone_is_the_tokenizers(tmp_path: Path) -> None:
    """llava-hf/llava-1.5-7b-hf and other image-text checkpoints saved before chat_template.jinja keep their template
    in chat_template.json, for the processor; the tokenizer has none, and such a model was refused as having no
    template. The processor's is the model's template, and trains the replies as the text-parts tests above show."""
    import json

    from tunelab.config import ModelSettings, TokenizerSettings
    from tunelab.models import load_tokenizer

    tok = trl_tokenizer("llava_next")
    template, tok.chat_template = tok.chat_template, None
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = load_tokenizer(TokenizerSettings(), ModelSettings(id=str(tmp_path)))
    assert loaded.chat_template == template
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    assert supervised_replies(loaded, chat) == [TEXT_PARTS["llava_next"].format("Hello.")]
    own = load_tokenizer(TokenizerSettings(chat_template="builtin:llama3"), ModelSettings(id=str(tmp_path)))
    assert own.chat_template == resolve_template("builtin:llama3", own)  # a template set in the file wins


def test_a_template_that_prints_no_message_text_is_refused_in_one_line() -> None:
    tok = trl_tokenizer("llama3_1")
    tok.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(TunelabError) as e:
        tokenize_example(
            tok, {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
        )
    assert str(e.value).startswith("tokenizer.chat_template: the chat template prints no message's text")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(TEXT_PARTS))
def test_lm_evals_string_prompts_reach_a_template_that_prints_only_text_parts(name: str) -> None:
    """lm-eval renders the tokenizer's template itself with string contents: the template it gets turns them into
    text parts first, so its prompts carry their text."""
    from tunelab.templates import for_outside_renderer

    tok = trl_tokenizer(name, extra=("<end_of_utterance>",))
    chat = [{"role": "user", "content": "Which city is the capital of Molo?"}]
    try:
        before = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # LLaVA-NeXT's fails on string contents
        before = repr(e)
    assert "capital of Molo" not in before
    parts = tok.apply_chat_template(text_parts(chat), tokenize=False, add_generation_prompt=True)
    after = for_outside_renderer(tok, {}).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert after == parts
    assert for_outside_renderer(trl_tokenizer("llama3_1"), {}).chat_template == trl_tokenizer("llama3_1").chat_template


# chujiezheng/chat_templates (github, commit 11c4956) chat_templates/chatml.jinja, byte for byte: a collection of
# templates written across lines for reading, whose README says to strip the whitespace between tags before use.
SPREAD_CHATML = """{% if messages[0]['role'] == 'system' %}
    {% set offset = 1 %}
{% else %}
    {% set offset = 0 %}
{% endif %}

{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == offset) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}

    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}
{% endfor %}

{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\\n' }}
{% endif %}"""


# MiniMax-M2's layout (its special tokens, and a generation prompt that opens a <think> block the written-out replies
# do not have, as its template in llama.cpp's models/templates does; Nemotron-Nano-v2's does likewise), cut down.
PREFILLING = (
    "{{- ']~!b[]~b]system\\nYou are a helpful assistant.[e~[\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- ']~b]user\\n' + m.content + '[e~[\\n' -}}"
    "{%- elif m.role == 'assistant' -%}{{- ']~b]ai\\n' + m.content + '[e~[\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ']~b]ai\\n<think>\\n' -}}{%- endif -%}"
)


def test_a_template_whose_generation_prompt_opens_a_think_block_is_refused_saying_so() -> None:
    """Such a template asks for every reply after '<think>\\n' and writes none there: no reply has a place to be
    supervised. The refusal names what the generation prompt adds, rather than blaming a moved system message."""
    from tests.chat_fixtures import tokenizer

    special = ["]~!b[", "]~b]", "[e~[", "<think>"]
    spec = dict(pieces="byte-level", special=special, bos=None, eos="[e~[", pad=None, unk=None, add_bos=False)
    tok = tokenizer(spec, PREFILLING)
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(TunelabError) as e:
        tokenize_example(tok, chat)
    assert str(e.value).startswith(
        "record: the chat template's generation prompt goes on with '<think>\\n', which assistant message 1 does not "
        "begin with once written out"
    )
    assert str(e.value).endswith("set tokenizer.chat_template to a template that marks replies with {% generation %}")


def test_a_template_spread_over_lines_is_refused_for_its_whitespace_and_trains_once_trimmed() -> None:
    tok = trl_tokenizer("qwen2_5")
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    tok.chat_template = SPREAD_CHATML
    with pytest.raises(TunelabError) as e:
        tokenize_example(tok, row)
    assert "the chat template writes other whitespace between turns when it ends with the generation prompt" in str(
        e.value
    )
    tok.chat_template = SPREAD_CHATML.replace("    ", "").replace("\n", "")  # as the collection's README says
    assert supervised_replies(tok, row) == ["Hello.<|im_end|>"]
