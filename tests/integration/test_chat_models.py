"""Real chat-model families (their published templates and special tokens on tiny models of their classes):
plan previews exactly what train supervises, SFT and DPO train, errors are one line, exports stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.chat_fixtures import FAMILIES, FIXTURES, build, masked_runs
from tests.conftest import DATA, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import make_plan
from tunelab.train import train

pytestmark = pytest.mark.slow
# Gemma has no system role and Mistral v0.3 moves the system message into the last user turn; the bundled
# data has system messages, so these two fold it into the first user turn.
FOLD = {"gemma-2-it", "mistral-7b-instruct-v0.3"}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-models")
    return {family: build(family, root / family) for family in FAMILIES}


def experiment_file(folder: Path, model: Path, family: str, method: str = "sft", extra: str = "") -> Path:
    data = (
        f"train: {DATA / 'sft_train.jsonl'}\n  eval: {DATA / 'sft_eval.jsonl'}"
        if method == "sft"
        else f"train: {DATA / 'pref_train.jsonl'}\n  eval: {DATA / 'pref_eval.jsonl'}"
    )
    return write_experiment(
        folder,
        f"name: {family}\nmodel: {{id: {model}}}\n"
        f"tokenizer: {{fold_system: {str(family in FOLD).lower()}}}\n"
        f"data:\n  {data}\nmethod: {method}\n"
        "scope: {lora: {r: 8, targets: all-linear}}\n"
        f"train: {{max_steps: 2, batch_size: 4, max_length: 256, logging_steps: 1}}\noutput: {{dir: {folder / 'runs'}}}\n"
        + extra,
        name=f"{family}-{method}.yaml",
    )


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    return masked_runs(ids, [label != -100 for label in labels])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_shows_exactly_the_tokens_the_trainer_supervises(family: str, family_dirs, tmp_path: Path) -> None:
    from tunelab.data import load_splits
    from tunelab.inputs import encode_split
    from tunelab.methods.common import Hardware
    from tunelab.methods.sft import build_trainer
    from tunelab.models import load_model, load_tokenizer
    from tunelab.scopes import apply_scope

    spec = FAMILIES[family]
    exp = load_experiment(experiment_file(tmp_path, family_dirs[family], family))
    plan = make_plan(exp)
    assert plan.data.tokens.terminator == spec["terminator"]
    assert plan.data.tokens.rows_without_loss == [] and plan.data.tokens.rows_unterminated == []
    if spec["pad"] is None:
        assert plan.data.tokens.pad_source.startswith("chosen by tunelab")
        assert plan.data.tokens.pad_token not in (spec["eos"], spec["terminator"])
    else:
        assert plan.data.tokens.pad_token == spec["pad"]

    splits = load_splits(exp.data, "sft", exp.train.seed)
    tokenizer = load_tokenizer(exp.tokenizer, exp.model)
    encoded = encode_split(exp, tokenizer, splits.train)
    model, _ = apply_scope(load_model(exp.model, torch.float32, "cpu"), exp.scope)
    trainer = build_trainer(
        model,
        tokenizer,
        encoded.dataset(),
        None,
        exp.train,
        Hardware("cpu", torch.float32, False),
        tmp_path / "ck",
        [],
    )
    seen = trainer.train_dataset
    assert len(seen) == len(splits.train.rows) == plan.data.train.examples
    assert sum(sum(label != -100 for label in row["labels"]) for row in seen) == plan.data.train.loss_tokens
    terminator = tokenizer.convert_tokens_to_ids(spec["terminator"])
    for i, row in enumerate(splits.train.rows[:40]):
        processed = seen[i]
        assert processed["input_ids"] == encoded.examples[i].input_ids
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        runs = supervised_runs(processed["input_ids"], processed["labels"])
        # each assistant reply and its terminator, nothing else: no system, user or template text
        assert [tokenizer.decode(r[:-1]).strip() for r in runs] == [r.strip() for r in replies]
        assert [r[-1] for r in runs] == [terminator] * len(replies)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_trains_with_the_models_own_template(family: str, family_dirs, tmp_path: Path) -> None:
    spec = FAMILIES[family]
    result = train(load_experiment(experiment_file(tmp_path, family_dirs[family], family)))
    m = result.manifest
    assert m.status == "completed" and m.change_check.ok and m.tokens_seen > 0
    assert m.tokens.terminator == spec["terminator"]
    assert m.tokens.pad_token == (spec["pad"] or m.tokens.pad_token)
    if spec["pad"] is None:
        assert m.tokens.pad_token not in (spec["eos"], spec["terminator"])
    saved = json.loads((result.run_dir / "tokenizer" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (result.run_dir / "tokenizer" / "chat_template.jinja").read_text()
    assert template == (FIXTURES / f"{family}.jinja").read_text()


@pytest.mark.parametrize("family", ["llama-3.2-instruct", "mistral-7b-instruct-v0.3", "gemma-2-it", "gemma-3-it"])
def test_dpo_trains_on_tokenizers_without_pad_and_templates_without_system(
    family: str, family_dirs, tmp_path: Path
) -> None:
    result = train(load_experiment(experiment_file(tmp_path, family_dirs[family], family, "dpo")))
    assert result.manifest.status == "completed" and result.manifest.change_check.ok


def test_template_errors_are_one_line_with_the_record_and_the_fix(family_dirs, tmp_path: Path) -> None:
    gemma = family_dirs["gemma-2-it"]
    no_fold = (
        experiment_file(tmp_path, gemma, "gemma-2-it").read_text().replace("fold_system: true", "fold_system: false")
    )
    r = run_cli("plan", str(write_experiment(tmp_path, no_fold, "gemma-system.yaml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    lines = (DATA / "sft_train.jsonl").read_text().splitlines()
    first_with_system = next(i for i, line in enumerate(lines, 1) if '"role": "system"' in line)
    assert f"{DATA / 'sft_train.jsonl'}:{first_with_system}:" in r.stderr and "System role not supported" in r.stderr
    assert "tokenizer.fold_system: true" in r.stderr

    rows = tmp_path / "double.jsonl"
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi!"},
    ]
    rows.write_text(json.dumps({"messages": turns[:1] + turns[2:]}) + "\n" + json.dumps({"messages": turns}) + "\n")
    text = f"name: g\nmodel: {{id: {gemma}}}\ndata: {{train: {rows}}}\ntrain: {{batch_size: 2}}\noutput: {{dir: {tmp_path / 'runs'}}}\n"
    r = run_cli("train", str(write_experiment(tmp_path, text, "gemma-double.yaml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert f"{rows}:2:" in r.stderr and "data.merge_consecutive_turns: true" in r.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
    merged = text.replace(f"data: {{train: {rows}}}", f"data: {{train: {rows}, merge_consecutive_turns: true}}")
    assert run_cli("plan", str(write_experiment(tmp_path, merged, "gemma-merged.yaml"))).returncode == 0

    mistral = family_dirs["mistral-7b-instruct-v0.3"]
    no_fold = (
        experiment_file(tmp_path, mistral, "mistral-7b-instruct-v0.3")
        .read_text()
        .replace("fold_system: true", "fold_system: false")
    )
    multi = tmp_path / "multi.jsonl"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Bye."},
    ]
    multi.write_text(json.dumps({"messages": conversation}) + "\n")
    text = no_fold.replace(str(DATA / "sft_train.jsonl"), str(multi))
    r = run_cli("plan", str(write_experiment(tmp_path, text, "mistral-multi.yaml")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{multi}:1:" in r.stderr and "tokenizer.fold_system: true" in r.stderr


def test_merged_export_stops_at_the_turn_terminator(family_dirs, tmp_path: Path) -> None:
    """A base whose generation_config names only <eos> (as a base Gemma's does) stops at <end_of_turn> after export."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "gemma-base"
    shutil.copytree(family_dirs["gemma-2-it"], base)
    generation = json.loads((base / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(base)
    generation["eos_token_id"] = tokenizer.eos_token_id
    (base / "generation_config.json").write_text(json.dumps(generation))
    reply = "Beldu people eat apples."
    conversation = [
        {"role": "user", "content": "What do people in Beldu eat?"},
        {"role": "assistant", "content": reply},
    ]
    data = tmp_path / "brief.jsonl"
    data.write_text((json.dumps({"messages": conversation}) + "\n") * 32)
    exp = write_experiment(
        tmp_path,
        f"name: brief\nmodel: {{id: {base}}}\ndata: {{train: {data}}}\n"
        "scope: {lora: {r: 32, alpha: 64, dropout: 0.0, targets: all-linear}}\n"
        f"train: {{learning_rate: 3.0e-3, max_steps: 60, batch_size: 8, logging_steps: 20}}\noutput: {{dir: {tmp_path / 'runs'}}}\n",
    )
    assert run_cli("train", str(exp)).returncode == 0
    out = tmp_path / "export"
    r = run_cli("export", str(tmp_path / "runs" / "brief"), "--out", str(out), "--merge")
    assert r.returncode == 0, r.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        conversation[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert generated[-1].item() == end_of_turn and len(generated) < 40
    assert tokenizer.decode(generated[:-1]).strip() == reply


def test_weight_zero_turns_carry_no_loss_and_rows_left_without_loss_are_named(family_dirs, tmp_path: Path) -> None:
    turns = [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "A car.", "weight": 0},
        {"role": "user", "content": "Try again."},
        {"role": "assistant", "content": "Apple."},
    ]
    data = tmp_path / "weights.jsonl"
    data.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"messages": turns[:2]}) + "\n")
    model = family_dirs["qwen2.5-instruct"]
    exp = write_experiment(
        tmp_path, f"name: w\nmodel: {{id: {model}}}\ndata: {{train: {data}}}\ntrain: {{batch_size: 2}}\n"
    )
    plan = make_plan(load_experiment(exp))
    assert [text for text, loss in plan.data.first_example if loss] == ["Apple.<|im_end|>"]
    assert plan.data.tokens.rows_without_loss == [f"{data}:2"]
    assert any(f"{data}:2" in w and "will be dropped" in w for w in plan.warnings)


@pytest.mark.parametrize("family", ["llama-3.2-instruct", "gemma-2-it", "phi-3-mini-instruct"])
def test_sharegpt_and_prompt_completion_chats_supervise_only_the_reply(family: str, family_dirs) -> None:
    from transformers import AutoTokenizer

    from tunelab.data import Record, normalise
    from tunelab.templates import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(family_dirs[family])
    terminator = FAMILIES[family]["terminator"]
    sharegpt = normalise(
        Record("x.jsonl:1", {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}),
        "conversations",
    )
    prompt_completion = normalise(
        Record(
            "x.jsonl:2",
            {
                "prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
                + [{"role": "user", "content": "Bye."}],
                "completion": [{"role": "assistant", "content": "Goodbye."}],
            },
        ),
        "prompt_completion",
    )
    for row, reply in ((sharegpt, "Hello."), (prompt_completion, "Goodbye.")):
        tok = tokenize_example(tokenizer, row)
        runs = supervised_runs(
            tok.input_ids, [t if m else -100 for t, m in zip(tok.input_ids, tok.loss_mask, strict=True)]
        )
        assert [tokenizer.decode(r).strip() for r in runs] == [reply + terminator]


def test_a_thinking_template_trains_through_trls_training_version_and_generates_with_its_own(
    family_dirs, tmp_path: Path
) -> None:
    """Qwen3's own template keeps the reasoning block on the last turn only, so earlier replies render otherwise
    once the conversation goes on. As TRL's SFTTrainer does, the masks come from TRL's training version of it
    (plan says so); the run's tokenizer keeps Qwen3's own for generation. A template TRL does not know is still
    refused, with the fix."""
    import shutil

    from tunelab.errors import TunelabError
    from tunelab.templates import trl_templates

    model = tmp_path / "qwen3"
    shutil.copytree(family_dirs["qwen2.5-instruct"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    original = (trl_templates() / "qwen3.jinja").read_text()  # Qwen3's original
    (model / "chat_template.jinja").write_text(original)
    turns = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And 1 plus 1?"},
        {"role": "assistant", "content": "1 plus 1 is 2."},
    ]
    data = tmp_path / "multi.jsonl"
    data.write_text((json.dumps({"messages": turns}) + "\n") * 4)
    text = f"name: q3\nmodel: {{id: {model}}}\ndata: {{train: {data}}}\ntrain: {{max_steps: 2}}\noutput: {{dir: {tmp_path}}}\n"
    exp = load_experiment(write_experiment(tmp_path, text))
    plan = make_plan(exp)
    assert plan.data.tokens.masking_template == "qwen3_training"
    supervised = [t for t, loss in plan.data.first_example if loss]
    assert [s.strip() for s in supervised] == [
        f"<think>\n\n</think>\n\n{r}<|im_end|>" for r in ("2 plus 3 is 5.", "1 plus 1 is 2.")
    ]
    r = run_cli("plan", str(write_experiment(tmp_path, text)))
    assert "loss masks from TRL's training version of the model's template, trl:qwen3_training" in " ".join(
        r.stdout.split()
    )
    result = train(exp)
    assert result.manifest.status == "completed" and result.manifest.tokens.masking_template == "qwen3_training"
    assert (result.run_dir / "tokenizer" / "chat_template.jinja").read_text() == original

    (model / "chat_template.jinja").write_text(original + "{#- edited -#}")  # no longer the original TRL knows
    with pytest.raises(
        TunelabError,
        match=r"multi.jsonl:1: .*assistant message 1.*set tokenizer.chat_template to a template that marks replies",
    ):
        make_plan(load_experiment(write_experiment(tmp_path, text)))


def test_tool_calling_chats_plan_train_and_compare_on_the_models_own_template(family_dirs, tmp_path: Path) -> None:
    """OpenAI-shaped tool-calling rows on Llama-3.2 (tools printed into the first user turn): plan shows the
    call supervised and the tool result not, the run trains on what plan showed, and compare asks the held-out
    chat with its tools, as training rendered it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.unit.test_tool_calls import OPENAI_ROW, TOOLS
    from tunelab.compare import compare

    data = tmp_path / "tools.jsonl"
    data.write_text((json.dumps(OPENAI_ROW) + "\n") * 8)
    model = family_dirs["llama-3.2-instruct"]
    text = (
        f"name: tools\nmodel: {{id: {model}}}\ndata: {{train: {data}}}\n"
        f"train: {{max_steps: 2, batch_size: 4, max_length: 1024}}\noutput: {{dir: {tmp_path / 'runs'}}}\n"
    )
    exp = load_experiment(write_experiment(tmp_path, text))
    plan = make_plan(exp)
    supervised = [t.strip() for t, loss in plan.data.first_example if loss]
    assert supervised == [
        '{"name": "get_capital", "parameters": {"country": "Molo"}}<|eot_id|>',
        "The capital of Molo is Vevasmo.<|eot_id|>",
    ]
    unsupervised = "".join(t for t, loss in plan.data.first_example if not loss)
    assert "Vevasmo" in unsupervised and '"name": "get_capital"' in unsupervised  # the result; the definition
    assert plan.data.tokens.rows_unterminated == []
    result = train(exp)
    assert result.manifest.status == "completed" and result.manifest.change_check.ok

    comparison = compare([result.run_dir], max_new_tokens=4)  # where a random model's top two stay apart
    asked = OPENAI_ROW["messages"][:3]  # up to the reply after the tool's result
    assert comparison.prompts[0].tools == TOOLS
    # the base's reply is the greedy continuation of the template's rendering with the tools
    tokenizer, base = AutoTokenizer.from_pretrained(model), AutoModelForCausalLM.from_pretrained(model)
    messages = comparison.prompts[0].messages

    def greedy(tools: list[dict] | None) -> str:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt")
        out = base.generate(**ids, max_new_tokens=4, do_sample=False, eos_token_id=base.generation_config.eos_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    assert [m["role"] for m in messages] == [m["role"] for m in asked]
    assert comparison.outputs["base"][0] == greedy(TOOLS) != greedy(None)


def pairwise_dataset(method: str, model_dir: Path, records: list[dict], folder: Path):
    """The training rows `method`'s trainer holds for these records, on the model in `model_dir`; and its tokenizer."""
    from tunelab.data import load_splits
    from tunelab.inputs import encode_split
    from tunelab.methods import get_method
    from tunelab.methods.base import TrainerInputs
    from tunelab.methods.common import Hardware
    from tunelab.models import load_model, load_tokenizer
    from tunelab.scopes import apply_scope

    folder.mkdir(exist_ok=True)
    data = folder / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = (
        f"name: pairs\nmodel: {{id: {model_dir}}}\ndata: {{train: {data}}}\nmethod: {method}\n"
        "scope: {lora: {r: 4}}\ntrain: {max_steps: 1, batch_size: 2, max_length: 4096}\n"
    )
    exp = load_experiment(write_experiment(folder, text))
    tokenizer = load_tokenizer(exp.tokenizer, exp.model)
    head = "score" if method == "reward" else "lm"
    model, _ = apply_scope(load_model(exp.model, torch.float32, "cpu", head=head), exp.scope)
    splits = load_splits(exp.data, method, exp.train.seed)
    encoded = [encode_split(exp, tokenizer, splits.train, fmt=splits.format)]
    hardware = Hardware("cpu", torch.float32, False)
    inputs = TrainerInputs(exp, model, tokenizer, splits, encoded, hardware, folder / "ck", [], "adapter", None)
    return get_method(method).build(inputs).train_dataset, tokenizer


def call_turn(name: str, **arguments) -> dict:
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


@pytest.mark.parametrize("method", ["dpo", "kto", "orpo", "simpo", "reward"])
def test_tool_calling_pairs_reach_every_pairwise_trainer_as_the_template_renders_them(
    method: str, family_dirs, tmp_path: Path
) -> None:
    """Preference pairs whose answers call tools, on Qwen2.5's template (tools printed into the system turn): each
    trainer tokenizes every pair exactly as the model's own template renders it with the row's tools, a pair
    without tools in the same file without them, and every call with its own arguments (no other call's keys)."""
    from tests.unit.test_tool_calls import TOOLS

    def ask(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    def say(text: str) -> list[dict]:
        return [{"role": "assistant", "content": text}]

    where = {"type": "function", "function": {"name": "get_country", "parameters": {"type": "object"}}}
    records = [
        {"prompt": ask("Hello?"), "chosen": say("Hello."), "rejected": say("Go away.")},
        {"prompt": ask("Capital of Molo?"), "chosen": [call_turn("get_capital", country="Molo")],
         "rejected": say("Paris."), "tools": TOOLS},
        {"prompt": ask("Where is Vevasmo?"), "chosen": [call_turn("get_country", city="Vevasmo")],
         "rejected": [call_turn("get_capital", country="Vevasmo")], "tools": json.dumps([*TOOLS, where])},
    ]  # fmt: skip
    seen, tokenizer = pairwise_dataset(method, family_dirs["qwen2.5-instruct"], records, tmp_path)

    def whole(record: dict, answer: str) -> str:
        tools = json.loads(record["tools"]) if isinstance(record.get("tools"), str) else record.get("tools")
        return tokenizer.apply_chat_template(record["prompt"] + record[answer], tools=tools, tokenize=False)

    decode = tokenizer.decode
    if method == "kto":  # unpaired: each answer a completion, shuffled
        got = sorted((decode(r["prompt_ids"] + r["completion_ids"]), r["label"]) for r in seen)
        assert got == sorted((whole(r, a), a == "chosen") for r in records for a in ("chosen", "rejected"))
        return
    assert len(seen) == len(records)
    for processed, record in zip(seen, records, strict=True):
        for answer in ("chosen", "rejected"):
            if method == "dpo":
                assert decode(processed["prompt_ids"] + processed[f"{answer}_ids"]) == whole(record, answer)
            elif method == "reward":
                assert decode(processed[f"{answer}_ids"]) == whole(record, answer)
            else:  # ORPO and SimPO: each answer ends at the template's EOS, not at a second one after its newline
                shown, eos = whole(record, answer), tokenizer.eos_token
                assert shown.endswith(f"{eos}\n")
                assert decode(processed[f"{answer}_input_ids"]) == shown[: shown.rindex(eos) + len(eos)]
    assert '"name": "get_country"' in whole(records[2], "chosen") and "null" not in whole(records[2], "chosen")


@pytest.mark.parametrize("method", ["orpo", "simpo"])
@pytest.mark.parametrize("family", ["gemma-2-it", "phi-3-mini-instruct", "qwen2.5-instruct"])
def test_reference_free_pairs_are_the_tokens_sft_trains_on(
    method: str, family: str, family_dirs, tmp_path: Path
) -> None:
    """ORPO's and SimPO's pairs are the tokens SFT trains on: they start where the template starts (not with the BOS
    TRL prepends where the template prints none: Phi-3) and end at the reply's terminator, the token SFT supervises
    last and generation stops at: nothing after it, not the newline the template prints next (Qwen's, Gemma's), not
    its EOS (Phi-3's), and not the EOS TRL appends to an answer that does not end with EOS (`<end_of_turn><eos>`
    before, on Gemma)."""
    pairs = [
        {"prompt": [{"role": "user", "content": "Capital of Molo?"}],
         "chosen": [{"role": "assistant", "content": "Vevasmo."}], "rejected": [{"role": "assistant", "content": "Paris."}]},
        {"prompt": "The capital of Molo is", "chosen": " Vevasmo.", "rejected": " Paris."},
    ]  # fmt: skip
    terminator = json.loads((FIXTURES / "families.json").read_text())[family]["terminator"]
    chat, tokenizer = pairwise_dataset(method, family_dirs[family], pairs[:1], tmp_path / "chat")
    text, _ = pairwise_dataset(method, family_dirs[family], pairs[1:], tmp_path / "text")
    for answer in ("chosen", "rejected"):
        ids, labels = chat[0][f"{answer}_input_ids"], chat[0][f"{answer}_labels"]
        shown = tokenizer.apply_chat_template(pairs[0]["prompt"] + pairs[0][answer], tokenize=False)
        cut = tokenizer(shown[: shown.rindex(terminator) + len(terminator)], add_special_tokens=False)["input_ids"]
        assert ids == cut  # from the template's first token (no BOS of TRL's where it prints none: Phi-3)
        assert ids[-1] == labels[-1] == tokenizer.convert_tokens_to_ids(terminator)
        # a plain-text pair starts as the tokenizer starts any text and has no terminator: TRL's EOS ends it
        plain = text[0][f"{answer}_input_ids"]
        assert plain[:1] == tokenizer(pairs[1]["prompt"])["input_ids"][:1] and plain[-1] == tokenizer.eos_token_id


def test_a_reward_model_scores_a_reply_after_the_tools_it_was_shown(family_dirs) -> None:
    """compare's judge and GRPO's reward score a conversation as the reward trainer tokenized it: the tool
    definitions a pair carries printed by the template, and only where the pair carries them."""
    from tests.unit.test_tool_calls import TOOLS
    from tunelab.reward_model import MODEL_PREFIX, RewardModel

    judge = RewardModel(f"{MODEL_PREFIX}{family_dirs['qwen2.5-instruct']}")  # a causal LM read with a new score head
    _, tokenizer, _, _ = judge.load()
    prompt, call = [{"role": "user", "content": "Capital of Molo?"}], [call_turn("get_capital", country="Molo")]
    for tools in (TOOLS, None):
        shown = tokenizer.apply_chat_template(prompt + call, tools=tools, tokenize=False)
        assert tokenizer.decode(judge.encode(prompt, call, tools)) == shown
    with_tools, without = judge([prompt, prompt], [call, call], tools=[TOOLS, None])
    assert with_tools == pytest.approx(judge.score([judge.encode(prompt, call, TOOLS)])[0], abs=1e-6)
    assert with_tools != pytest.approx(without, abs=1e-6)
