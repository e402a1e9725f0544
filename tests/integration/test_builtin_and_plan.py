"""The built-in model, the loss mask, and `plan` on real files."""

import json
from pathlib import Path

from tests.chat_fixtures import supervised_replies
from tests.conftest import DATA, EXAMPLES
from tunelab.config import load_experiment
from tunelab.plan import make_plan
from tunelab.templates import tokenize_example


def test_builtin_model_loads_through_from_pretrained(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (tiny_model_dir / "model.safetensors.index.json").is_file() and (
        tiny_model_dir / "chat_template.jinja"
    ).is_file()
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eot_id|>" and tok.pad_token_id != tok.eos_token_id
    # Pre-training really happened: the model continues a corpus fact it has seen.
    ids = tok("The capital of", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert loss.item() < 4.0  # random init on this vocabulary gives about ln(875) = 6.8


def test_loss_mask_is_exactly_the_assistant_turns(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "2 plus 3 is 5."},
            {"role": "user", "content": "And 1 plus 1?"},
            {"role": "assistant", "content": "1 plus 1 is 2."},
        ]
    }
    assert supervised_replies(tok, row) == ["2 plus 3 is 5.<|eot_id|>", "1 plus 1 is 2.<|eot_id|>"]


def test_prompt_completion_mask_covers_completion_and_eos(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = tokenize_example(tok, {"prompt": "2 plus 3 is", "completion": " 5."})
    assert tok.decode([i for i, m in zip(t.input_ids, t.loss_mask, strict=True) if m]).endswith("5.<|eot_id|>")
    assert t.loss_mask[0] == 0


def test_plan_of_quickstart(tiny_model_dir: Path) -> None:
    plan = make_plan(load_experiment(EXAMPLES / "quickstart.yaml"))
    out = plan.to_json()
    assert out["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert out["layers"] == [0, 1, 2, 3]
    # h=128, kv=64, i=256, r=16, 4 layers
    per_layer = 16 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 256) * 3)
    assert out["trainable_params"] == 4 * per_layer
    m = out["memory"]
    assert m["total_bytes"] == m["weights_bytes"] + m["gradients_bytes"] + m["optimizer_bytes"] + m["activations_bytes"]
    assert m["reference"] is None and m["reference_bytes"] == 0
    assert out["data"]["train"]["examples"] == len((DATA / "sft_train.jsonl").read_text().splitlines())
    assert out["data"]["train"]["truncated"] == 0
    loss_text = "".join(s["text"] for s in out["data"]["first_example"] if s["loss"])
    assert loss_text.endswith("<|eot_id|>") and "user" not in loss_text


def test_plan_counts_truncation(tiny_model_dir: Path) -> None:
    plan = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", ["train.max_length=30"]))
    assert plan.data.train.truncated > 0
    assert any("will be truncated" in w for w in plan.warnings)


def test_plan_json_matches_trained_scope_on_real_weights(tiny_model_dir: Path) -> None:
    """The meta-device plan and the scope applied to the loaded model agree tensor for tensor."""
    from tunelab.models import load_model
    from tunelab.scopes import apply_scope

    for example in ("lora-last-half.yaml", "partial-last4.yaml"):
        exp = load_experiment(EXAMPLES / example)
        plan = make_plan(exp)
        import torch

        _, real = apply_scope(load_model(exp.model, torch.float32, "cpu"), exp.scope)
        assert real.trainable_params == plan.scope.trainable_params
        assert real.trainable_names == plan.scope.trainable_names
        json.dumps(plan.to_json())


def test_plan_shows_dpo_reference_cost(tiny_model_dir: Path) -> None:
    lora = make_plan(load_experiment(EXAMPLES / "dpo.yaml"))
    assert lora.memory.reference == "adapter" and lora.memory.reference_bytes == lora.scope.trainable_params * 4
    partial = make_plan(load_experiment(EXAMPLES / "dpo.yaml", ["scope={partial: {last_blocks: 1}}"]))
    assert partial.memory.reference == "precomputed" and partial.memory.reference_bytes == 0
    live = make_plan(
        load_experiment(EXAMPLES / "dpo.yaml", ["scope={partial: {last_blocks: 1}}", "dpo.reference=live"])
    )
    assert live.memory.reference == "copy"
    assert live.memory.reference_bytes == live.memory.weights_bytes  # a second full copy of the base
    assert partial.memory.tokens_per_forward == 2 * 8 * 256  # chosen and rejected


def test_plain_text_prompts_train_raw_unless_as_chat_puts_them_in_the_chat_format(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """String prompt/completion rows are raw text to TRL; on a chat model plan says so, and data.as_chat renders them
    through the model's template: the prompt a user turn, the answer the assistant's supervised reply."""
    rows = [{"prompt": "What language is spoken in Ortan?", "completion": "People in Ortan speak Kelvish."}] * 16
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = [f"data.train={path}", "data.eval=null"]

    def first_example(plan) -> tuple[str, str]:
        segments = plan.to_json()["data"]["first_example"]
        return "".join(s["text"] for s in segments), "".join(s["text"] for s in segments if s["loss"])

    raw = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", settings))
    assert [w for w in raw.warnings if w.startswith("data.train holds plain-text prompts")]
    assert first_example(raw)[0] == "What language is spoken in Ortan?People in Ortan speak Kelvish.<|eot_id|>"
    chat = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", [*settings, "data.as_chat=true"]))
    assert not [w for w in chat.warnings if "plain-text" in w]
    text, supervised = first_example(chat)
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat language is spoken in Ortan?<|eot_id|>" in text
    assert supervised == "People in Ortan speak Kelvish.<|eot_id|>"


def test_loss_on_all_tokens_supervises_prompts_too_as_trls_default_does(tiny_model_dir: Path) -> None:
    """data.loss_on: all trains every token of a chat (TRL's SFTTrainer default for conversations); the replies'
    terminators are still found, and plan does not warn that prompts carry loss, as it asked for."""
    from transformers import AutoTokenizer

    from tunelab.data import load_splits
    from tunelab.errors import TunelabError
    from tunelab.inputs import encode_split

    replies = load_experiment(EXAMPLES / "quickstart.yaml")
    every = load_experiment(EXAMPLES / "quickstart.yaml", ["data.loss_on=all"])
    assert every.config_hash() != replies.config_hash()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = load_splits(every.data, "sft", every.train.seed).train
    encoded = {name: encode_split(exp, tok, split) for name, exp in (("replies", replies), ("all", every))}
    dataset = encoded["all"].dataset()
    assert dataset["labels"] == dataset["input_ids"]
    assert encoded["all"].terminators == encoded["replies"].terminators and encoded["all"].all_loss == []
    assert encoded["replies"].dataset()["labels"] != dataset["labels"]
    plan = make_plan(every)
    lengths = encoded["all"].lengths()
    assert plan.data.train.loss_tokens == int(lengths.clip(max=every.train.max_length).sum())
    assert all(loss for _, loss in plan.data.first_example)
    assert not any("carry loss on every token" in w for w in plan.warnings)
    assert plan.data.tokens.terminator == "<|eot_id|>"
    try:
        load_experiment(EXAMPLES / "dpo.yaml", ["data.loss_on=all"])
    except TunelabError as e:
        assert "data.loss_on: DPO scores the chosen and rejected answers, not every token" in str(e)
    else:
        raise AssertionError("DPO with data.loss_on: all was accepted")


def test_a_max_length_past_the_models_positions_is_refused_or_warned(tmp_path: Path, tiny_model_dir: Path) -> None:
    """GPT-2's 1024 learned position embeddings end there (a longer example stops training with an index error);
    a rotary model runs on past its max_position_embeddings (the built-in model's 512), on positions it never saw."""
    from transformers import GPT2Config

    from tests.conftest import write_experiment
    from tunelab.errors import TunelabError

    GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256).save_pretrained(tmp_path / "gpt2")
    gpt2 = write_experiment(tmp_path, f"name: g\nmodel: {{id: gpt2}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n")
    try:
        make_plan(load_experiment(gpt2, ["train.max_length=2048"]))
    except TunelabError as e:
        assert str(e) == (
            "train.max_length: 2048 is past the 1024 positions the model learned embeddings for, and an example "
            "longer than that stops training; set train.max_length: 1024"
        )
    else:
        raise AssertionError("a max_length past GPT-2's learned positions was planned")
    assert make_plan(load_experiment(gpt2, ["train.max_length=1024"])).memory is not None

    chat = {"role": "user", "content": "Tell me about Molo."}
    reply = {"role": "assistant", "content": " ".join(["The capital of Molo is Vevasmo."] * 80)}  # ~584 tokens
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"messages": [chat, reply]}) + "\n" for _ in range(8)))
    past = [
        w
        for w in make_plan(
            load_experiment(EXAMPLES / "quickstart.yaml", [f"data.train={long}", "train.max_length=1024"])
        ).warnings
        if "positions" in w
    ]
    assert past == [
        "8 of 8 training examples are longer than the 512 positions the model was trained on "
        "(max_position_embeddings), and train.max_length=1024 keeps them: it has never seen those positions; set "
        "train.max_length: 512, or extend its context (rope_scaling) on purpose"
    ]
    within = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", [f"data.train={long}", "train.max_length=512"]))
    assert not [w for w in within.warnings if "positions" in w]


def test_plan_on_a_large_split_reads_rows_spread_over_it_and_says_its_counts_are_of_those(tmp_path: Path) -> None:
    """plan tokenizes 2,000 rows of a larger split (train tokenizes all), spread evenly over it: on a file sorted by
    length, whose first 2,000 rows are all short, it still counts the long rows at its end. Its table, truncation,
    loss and position warnings say their counts are of the rows read, and about how many of the split they make."""
    from tests.conftest import run_cli
    from tunelab.inputs import PLAN_ROWS

    short, long = "The capital of Molo is Vevasmo.", " ".join(["The capital of Molo is Vevasmo."] * 80)  # ~584 tokens

    def row(i: int, asked: str, reply: str) -> str:
        chat = [{"role": "user", "content": f"{asked} ({i})"}, {"role": "assistant", "content": reply}]
        return json.dumps({"messages": chat}) + "\n"

    # 4,000 rows: 2,000 short, then 200 long questions (no loss within max_length) and 1,800 long replies
    kinds = [("Tell me about Molo.", short)] * PLAN_ROWS + [(long, short)] * 200
    kinds += [("Tell me about Molo.", long)] * (2 * PLAN_ROWS - len(kinds))
    data = tmp_path / "large.jsonl"
    data.write_text("".join(row(i, asked, reply) for i, (asked, reply) in enumerate(kinds)))
    sets = [f"data.train={data}", "data.eval=null", "train.max_length=560"]
    plan = make_plan(load_experiment(EXAMPLES / "quickstart.yaml", sets))
    # every second row read: 100 of the long questions, 900 of the long replies
    assert (plan.data.train.examples, plan.data.train.measured, plan.data.train.truncated) == (4000, 2000, 1000)
    read = "of the 2,000 training examples plan read, spread over all 4,000 (so about 2,000 in all)"
    assert [w for w in plan.warnings if "longer than" in w or "no loss" in w] == [
        f"1,000 {read} are longer than the 512 positions the model was trained on (max_position_embeddings), and "
        "train.max_length=560 keeps them: it has never seen those positions; set train.max_length: 512, or extend "
        "its context (rope_scaling) on purpose",
        f"100 rows of the 2,000 rows plan read (5% of them) carry no loss within train.max_length=560 and will be "
        f"dropped ({data}:2001, {data}:2003, {data}:2005, ...); raise train.max_length or fix those rows",
        f"1,000 {read} are longer than train.max_length=560 and will be truncated",
    ]
    shown = run_cli("plan", str(EXAMPLES / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)])
    assert shown.returncode == 0, shown.stderr
    assert (
        "train: the token columns count 2,000 of its 4,000 rows, spread over it, as plan reads them (tunelab train "
        "tokenizes every row)"
    ) in shown.stdout
