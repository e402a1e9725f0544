"""The mission's model as a user downloads it: meta-llama/Llama-3.1-8B-Instruct's own tokenizer (Meta's
tokenizer.model, from Meta's llama-models package), template, config.json and generation_config.json, on two narrow
layers. Meta's reference encoder (llama-models' tiktoken Tokenizer and ChatFormat) is the oracle: what tunelab
tokenizes, supervises and counts is token for token what Meta's own code produces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chat_fixtures import (
    FIXTURES,
    LLAMA31_GENERATION,
    build_meta_llama31,
    masked_runs,
    meta_llama3_reference,
)
from tests.conftest import DATA, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import make_plan
from tunelab.templates import tokenize_example

# Llama 3.1's template opens every chat with a system turn holding these lines (and the user's system message).
DATE_LINES = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
EOT = 128009
# What real chats hold and the bundled data does not: accents, CJK, emoji, digits, code, stray whitespace.
EDGE_CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Réponds en français.  "},
            {"role": "user", "content": "  Qu'est-ce que 12345 + 678?\n"},
            {"role": "assistant", "content": "\n12345 + 678 = 13023.\n\n```python\nprint(12345 + 678)\n```\n  "},
            {"role": "user", "content": "日本語で？"},
            {"role": "assistant", "content": "一万三千二十三です。 🎉"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "List three\ttabs and  double  spaces."},
            {"role": "assistant", "content": "a\tb\tc  --  'quoted' \"and\" don't."},
        ]
    },
]


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    return build_meta_llama31(tmp_path_factory.mktemp("hub") / "Llama-3.1-8B-Instruct")


@pytest.fixture(scope="module")
def tokenizer(download: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(download)


def chats() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    return rows + EDGE_CHATS


def meta_chat(messages: list[dict]) -> list[int]:
    """Meta's ChatFormat encoding of a whole conversation, with the system turn Llama 3.1's template writes."""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    reference = meta_llama3_reference()
    chat = ChatFormat(reference)
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    turns = [{"role": "system", "content": DATE_LINES + system}]
    turns += [{"role": m["role"], "content": m["content"].strip()} for m in messages if m["role"] != "system"]
    ids = [reference.bos_id]
    for m in turns:
        message = RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn)
        ids += chat.encode_message(message, tool_prompt_format=None)[0]
    return ids


def meta_replies(messages: list[dict]) -> list[list[int]]:
    """Each assistant reply as Meta encodes it, closed by <|eot_id|>: what should carry loss."""
    reference = meta_llama3_reference()
    return [
        reference.encode(m["content"].strip(), bos=False, eos=False) + [EOT]
        for m in messages
        if m["role"] == "assistant"
    ]


def test_the_tokenizer_encodes_as_metas_tiktoken_encoder(tokenizer) -> None:
    reference = meta_llama3_reference()
    texts = [m["content"] for row in chats() for m in row["messages"]]
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text, bos=False, eos=False)
    # the published case of Meta's own tests, and a BOS in front of plain text as Meta's encode(bos=True)
    assert tokenizer("This is a test sentence.")["input_ids"] == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert tokenizer.decode([EOT]) == "<|eot_id|>" and tokenizer.eos_token_id == EOT


def test_chats_tokenize_and_supervise_as_metas_chat_format(tokenizer) -> None:
    for row in chats():
        tok = tokenize_example(tokenizer, row)
        assert tok.input_ids == meta_chat(row["messages"])
        assert masked_runs(tok.input_ids, tok.loss_mask) == meta_replies(row["messages"])
        assert tok.terminators == [EOT] * len(meta_replies(row["messages"]))


def test_plan_counts_the_tokens_meta_would(download: Path, tmp_path: Path) -> None:
    exp = load_experiment(
        write_experiment(
            tmp_path,
            f"name: mission\nmodel: {{id: {download}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}}}\n"
            "scope: {lora: {r: 16, targets: qv}}\ntrain: {max_length: 4096}\n",
        )
    )
    plan = make_plan(exp)
    rows = chats()[: -len(EDGE_CHATS)]
    assert plan.data.train.examples == len(rows)
    assert plan.data.train.loss_tokens == sum(len(r) for row in rows for r in meta_replies(row["messages"]))
    assert plan.data.train.truncated == 0
    assert plan.data.tokens.terminator == "<|eot_id|>"
    # Meta reserves a token for padding; EOS and <|eot_id|> must not pad, or the loss would never see them
    assert plan.data.tokens.pad_token == "<|finetune_right_pad_id|>"
    assert plan.data.tokens.rows_without_loss == [] and plan.data.tokens.rows_unterminated == []


@pytest.mark.slow
def test_the_mission_runs_end_to_end_on_the_download(download: Path, tmp_path: Path) -> None:
    """SFT LoRA, then DPO on the SFT adapter, then a merged export that plain Transformers loads and that keeps
    the model's own template and stop tokens, and compare over both runs: the scripts' whole workflow."""
    runs = tmp_path / "runs"
    common = (
        f"model: {{id: {download}}}\ntrain: {{max_steps: 2, batch_size: 2, max_length: 256}}\noutput: {{dir: {runs}}}\n"
    )
    sft = write_experiment(
        tmp_path,
        f"name: sft\n{common}data: {{train: {DATA / 'sft_train.jsonl'}}}\n"
        "scope: {lora: {r: 8, targets: qkvo, layers: last-half}}\n",
        name="sft.yaml",
    )
    dpo = write_experiment(
        tmp_path,
        f"name: dpo\n{common}data: {{train: {DATA / 'pref_train.jsonl'}}}\nmethod: dpo\n"
        f"init_from: {runs / 'sft'}\nscope: {{lora: {{r: 8, targets: qkvo, layers: last-half}}}}\n",
        name="dpo.yaml",
    )
    for experiment in (sft, dpo):
        done = run_cli("train", str(experiment))
        assert done.returncode == 0, done.stderr[-3000:]
        manifest = json.loads((runs / experiment.stem / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["change_check"]["ok"]

    merged = tmp_path / "merged"
    exported = run_cli("export", str(runs / "dpo"), "--out", str(merged), "--merge")
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.generation_config.eos_token_id == LLAMA31_GENERATION["eos_token_id"]
    assert AutoTokenizer.from_pretrained(merged).chat_template == (FIXTURES / "llama-3.1-instruct.jinja").read_text()

    report = tmp_path / "report"
    prompts = (DATA / "prompts.jsonl").read_text().splitlines()[:4]  # random weights generate to the length limit
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(prompts) + "\n")
    compared = run_cli(
        "compare", str(runs / "sft"), str(runs / "dpo"), "--prompts", str(prompts_file), "--out", str(report)
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads((report / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["base", "sft", "dpo"]
    assert {name: len(o) for name, o in report["outputs"].items()} == dict.fromkeys(
        ["base", "sft", "dpo"], len(prompts)
    )


@pytest.mark.slow
def test_dpo_pairs_reach_the_trainer_as_meta_encodes_them(download: Path, tmp_path: Path) -> None:
    """TRL tokenizes preference pairs itself: its prompt ids are Meta's encoding of the conversation up to the
    reply, and each answer is Meta's encoding of the reply closed by <|eot_id|> (no second BOS, nothing cut)."""
    import torch

    from tunelab.data import load_splits
    from tunelab.methods import get_method
    from tunelab.methods.base import TrainerInputs
    from tunelab.methods.common import Hardware
    from tunelab.models import load_model, load_tokenizer
    from tunelab.scopes import apply_scope

    exp = load_experiment(
        write_experiment(
            tmp_path,
            f"name: pairs\nmodel: {{id: {download}}}\ndata: {{train: {DATA / 'pref_train.jsonl'}}}\nmethod: dpo\n"
            "scope: {lora: {r: 8, targets: qv}}\ntrain: {max_steps: 1, batch_size: 2, max_length: 256}\n",
        )
    )
    splits = load_splits(exp.data, exp.method, exp.train.seed)
    tokenizer = load_tokenizer(exp.tokenizer, exp.model)
    tokenizer.pad_token = "<|finetune_right_pad_id|>"
    model, _ = apply_scope(load_model(exp.model, torch.float32, "cpu"), exp.scope)
    hardware = Hardware("cpu", torch.float32, False)
    inputs = TrainerInputs(exp, model, tokenizer, splits, [], hardware, tmp_path / "ck", [], "adapter", None)
    seen = get_method("dpo").build(inputs).train_dataset
    assert len(seen) == len(splits.train.rows)
    for processed, row in zip(seen, splits.train.rows, strict=True):
        # the conversation and the assistant header that opens the reply: an empty reply's encoding, unclosed
        assert processed["prompt_ids"] == meta_chat([*row["prompt"], {"role": "assistant", "content": ""}])[:-1]
        assert [processed["chosen_ids"]] == meta_replies(row["chosen"])
        assert [processed["rejected_ids"]] == meta_replies(row["rejected"])
