"""`tunelab init`: a first experiment file for the user's model and data that plan takes as it is, for each of the
scripts' scopes; the method follows the data; nothing existing is replaced and bad input writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, dataset_repository, run_cli
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan
from tunelab.starter import write_starter

MODEL = "builtin:tiny-chat"


def layers(modules: list[str]) -> set[int]:
    return {int(m.split(".layers.")[1].split(".")[0]) for m in modules if ".layers." in m}


@pytest.mark.parametrize("scope", ["qv", "qkvo", "all-linear", "last-half", "partial-last4", "full-ft"])
def test_each_scope_writes_a_file_plan_takes_as_it_is(scope: str, tmp_path: Path) -> None:
    starter = write_starter(tmp_path / "exp.yaml", MODEL, str(DATA / "sft_train.jsonl"), None, scope, None, None)
    exp = load_experiment(starter.path)
    assert exp == starter.exp and exp.method == "sft" and exp.data.eval_fraction == 0.05
    plan = make_plan(exp)
    s = plan.scope
    n = plan.model.layers
    match scope:
        case "qv" | "qkvo" | "all-linear" | "last-half":
            suffixes = {m.rsplit(".", 1)[-1] for m in s.lora_modules}
            want = {"qv": {"q_proj", "v_proj"}, "qkvo": {"q_proj", "k_proj", "v_proj", "o_proj"}}
            assert suffixes == want.get(
                scope, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            )
            assert layers(s.lora_modules) == (set(range(n // 2, n)) if scope == "last-half" else set(range(n)))
            assert exp.train.learning_rate == 2e-4 and exp.train.epochs == 1
        case "partial-last4":
            assert layers(s.trainable_names) == set(range(n - 4, n))
            assert {"model.norm.weight", "lm_head.weight"} <= set(s.trainable_names)
            assert exp.train.learning_rate == 5e-6 and exp.train.epochs == 2  # train_partial_ft.py's rhythm
        case "full-ft":
            assert s.trainable_params == s.total_params and exp.train.learning_rate == 5e-6


@pytest.mark.parametrize("scope", ["all-linear", "qkvo"])
def test_a_moe_model_gets_a_file_plan_takes_as_it_is(scope: str, tmp_path: Path) -> None:
    """Qwen3-30B-A3B's published config: all-linear reaches its fused expert weights, which PEFT trains only without
    dropout. init wrote the usual dropout 0.05, and plan refused the file it had just written; init now writes 0 there
    (and keeps 0.05 where only linear layers train)."""
    model = str(CONFIGS / "qwen3-30b-a3b")
    starter = write_starter(tmp_path / "exp.yaml", model, str(DATA / "sft_train.jsonl"), None, scope, None, None)
    exp = load_experiment(starter.path)
    assert exp.scope.lora.dropout == (0.0 if scope == "all-linear" else 0.05)
    assert ("no dropout (PEFT trains its fused experts without it)" in starter.trains) == (scope == "all-linear")
    plan = make_plan(exp)
    assert ("experts" in plan.scope.target_modules) == (scope == "all-linear")
    assert not any("dropout" in w for w in plan.scope.warnings)


def test_every_written_key_says_what_it_does(tmp_path: Path) -> None:
    path = write_starter(tmp_path / "exp.yaml", MODEL, str(DATA / "sft_train.jsonl"), None, "qv", None, None).path
    keys = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert len(keys) > 15 and all("  # " in line and not line.endswith("# ") for line in keys)


def test_the_method_follows_the_data(tmp_path: Path) -> None:
    pairs = write_starter(tmp_path / "a.yaml", MODEL, str(DATA / "pref_train.jsonl"), None, "qv", None, "pairs")
    assert pairs.exp.method == "dpo" and pairs.data_format == "preference" and pairs.exp.train.learning_rate == 5e-6
    thumbs = tmp_path / "thumbs.jsonl"
    thumbs.write_text(
        "".join(
            json.dumps({"prompt": f"Name fruit {i}.", "completion": "Apple.", "label": i % 2 == 0}) + "\n"
            for i in range(20)
        )
    )
    unpaired = write_starter(tmp_path / "b.yaml", MODEL, str(thumbs), None, "partial-last4", None, None)
    assert unpaired.exp.method == "kto" and unpaired.exp.train.learning_rate == 5e-7 and unpaired.rows == 20


def test_paths_given_from_here_are_written_from_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text((DATA / "sft_train.jsonl").read_text())
    (tmp_path / "data" / "eval.jsonl").write_text((DATA / "sft_eval.jsonl").read_text())
    done = run_cli(
        "init", "experiments/first.yaml", "--model", MODEL, "--data", "data/train.jsonl", "--eval", "data/eval.jsonl",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote experiments/first.yaml: sft on ../data/train.jsonl (messages, 348 rows")
    exp = load_experiment(tmp_path / "experiments" / "first.yaml")
    assert (exp.data.train, exp.data.eval) == (
        str(tmp_path / "data" / "train.jsonl"),
        str(tmp_path / "data" / "eval.jsonl"),
    )
    planned = run_cli("plan", "experiments/first.yaml", "--json", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["data"]["eval"]["examples"] == 40


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--data", "missing.jsonl"],
            "error: --data: data file 'missing.jsonl' not found (a relative path is read from the current folder)",
        ),
        (["--data", str(DATA / "sft_train.jsonl"), "--scope", "lm_head"], "error: --scope: 'lm_head' is not one of"),
        (["--data", str(DATA / "sft_train.jsonl"), "--method", "dpo"], "but method is dpo; set method: sft"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args: list[str], says: str, tmp_path: Path) -> None:
    done = run_cli("init", str(tmp_path / "exp.yaml"), "--model", MODEL, *args, cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr and not (tmp_path / "exp.yaml").exists()


def test_an_existing_file_is_never_replaced(tmp_path: Path) -> None:
    mine = tmp_path / "exp.yaml"
    mine.write_text("name: mine\n")
    with pytest.raises(TunelabError, match="already exists; give another path"):
        write_starter(mine, MODEL, str(DATA / "sft_train.jsonl"), None, "qv", None, None)
    assert mine.read_text() == "name: mine\n"


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    ("splits", "readme", "written"),
    [  # HuggingFaceH4/no_robots' SFT splits; the default layout, its splits read from the file names; one split only
        (["train_sft", "test_sft"], True, {"hub_split": "train_sft", "eval_split": "test_sft"}),
        (["train", "validation"], False, {"eval_split": "validation"}),
        (["train"], False, {"eval_fraction": 0.05}),
    ],
)
def test_a_dataset_with_splits_trains_on_its_training_split_and_holds_out_its_test_split(
    splits: list[str], readme: bool, written: dict, tmp_path: Path
) -> None:
    repo = dataset_repository(tmp_path / "repo", {s: [CHAT] * (i + 2) for i, s in enumerate(splits)}, readme)
    exp = write_starter(tmp_path / "exp.yaml", MODEL, str(repo), None, "qv", None, None).exp
    data = exp.data.model_dump(exclude_defaults=True)
    assert data == {"train": str(repo), **({"eval": str(repo)} if "eval_split" in written else {}), **written}
    loaded = load_experiment(tmp_path / "exp.yaml").data  # as plan and train read the file
    assert (loaded.hub_split, loaded.eval_split) == (written.get("hub_split", "train"), written.get("eval_split"))


def test_a_dataset_whose_splits_do_not_say_which_trains_asks_for_split(tmp_path: Path) -> None:
    """HuggingFaceH4/ultrachat_200k: train_sft and train_gen; the held-out split goes with the one chosen."""
    splits = {s: [CHAT] for s in ("train_sft", "test_sft", "train_gen", "test_gen")}
    repo = dataset_repository(tmp_path / "repo", splits)
    with pytest.raises(
        TunelabError, match=r"splits train_sft, test_sft, train_gen, test_gen, and which to train on is not clear from"
    ):
        write_starter(tmp_path / "exp.yaml", MODEL, str(repo), None, "qv", None, None)
    exp = write_starter(tmp_path / "exp.yaml", MODEL, str(repo), None, "qv", None, None, split="train_gen").exp
    assert (exp.data.hub_split, exp.data.eval, exp.data.eval_split) == ("train_gen", str(repo), "test_gen")
    with pytest.raises(TunelabError, match=r"^--split: '.*repo' has no split 'train'; its splits are train_sft, "):
        write_starter(tmp_path / "b.yaml", MODEL, str(repo), None, "qv", None, None, split="train")
    with pytest.raises(TunelabError, match=r"^--split: '.*sft_train.jsonl' is a file, which has no splits"):
        write_starter(tmp_path / "b.yaml", MODEL, str(DATA / "sft_train.jsonl"), None, "qv", None, None, split="x")


def test_init_renames_fields_and_puts_plain_text_in_the_chat_format(tmp_path: Path) -> None:
    """openai/gsm8k's question/answer rows: --columns and --as-chat are written into the file, which plan reads as
    chats (the question a user turn, the answer the supervised reply)."""
    rows = [{"question": f"What is {i} plus 2?", "answer": f"{i} plus 2 is {i + 2}."} for i in range(40)]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", str(data), "--columns", "question=prompt, answer=completion", "--as-chat"]
    done = run_cli("init", str(tmp_path / "exp.yaml"), "--model", MODEL, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exp = load_experiment(tmp_path / "exp.yaml")
    assert (exp.data.columns, exp.data.as_chat) == ({"question": "prompt", "answer": "completion"}, True)
    segments = make_plan(exp).to_json()["data"]["first_example"]
    supervised = "".join(s["text"] for s in segments if s["loss"])
    assert "<|start_header_id|>user<|end_header_id|>" in "".join(s["text"] for s in segments)
    assert re.fullmatch(r"\d+ plus 2 is \d+\.<\|eot_id\|>", supervised), supervised
    bad = run_cli("init", str(tmp_path / "b.yaml"), "--model", MODEL, "--data", str(data), "--columns", "question")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --columns: 'question' is not FIELD=NAME pairs")
    assert not (tmp_path / "b.yaml").exists()
    # Rows no shape fits: the renaming their fields suggest, said as init's flag, which then reads them.
    metamath = tmp_path / "metamath.jsonl"
    metamath.write_text("".join(json.dumps({"query": r["question"], "response": r["answer"]}) + "\n" for r in rows))
    asked = run_cli("init", str(tmp_path / "m.yaml"), "--model", MODEL, "--data", str(metamath))
    assert asked.returncode == 2 and not (tmp_path / "m.yaml").exists()
    flag = asked.stderr.strip().rpartition("rename yours with ")[2]
    assert flag == "--columns query=prompt,response=completion"
    done = run_cli("init", str(tmp_path / "m.yaml"), "--model", MODEL, "--data", str(metamath), *flag.split())
    assert done.returncode == 0, done.stderr


def test_init_says_what_prompts_alone_need(tmp_path: Path) -> None:
    """Prompts without answers are the data of GRPO and distill, which need reward functions and a teacher that init
    does not write: it says so, and writes nothing."""
    data = str(DATA / "grpo_train.jsonl")
    with pytest.raises(
        TunelabError, match=r"holds prompts without answers but method is sft; set method: grpo or distill"
    ):
        write_starter(tmp_path / "a.yaml", MODEL, data, None, "qv", None, None)
    with pytest.raises(TunelabError, match=r"^--method: grpo learns from reward functions, which init cannot write"):
        write_starter(tmp_path / "a.yaml", MODEL, data, None, "qv", "grpo", None)
    with pytest.raises(TunelabError, match=r"^--method: distill learns from a teacher model, which init does not ask"):
        write_starter(tmp_path / "a.yaml", MODEL, data, None, "qv", "distill", None)
    assert not (tmp_path / "a.yaml").exists()


def test_init_keeps_a_system_prompt_field_in_the_renaming_it_suggests(tmp_path: Path) -> None:
    """Open-Orca/OpenOrca's rows (system_prompt, question, response): the suggested flags keep the system prompt as
    the chat's system turn, which only the chat format has a place for, and with them init writes the file."""
    rows = [
        {"id": f"niv.{i}", "system_prompt": "Be brief.", "question": f"{i} plus 2?", "response": "4"} for i in range(40)
    ]
    data = tmp_path / "openorca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TunelabError) as refused:
        write_starter(tmp_path / "a.yaml", MODEL, str(data), None, "qv", None, None)
    flags = str(refused.value).rpartition("rename yours with ")[2]
    assert (
        flags
        == "--columns question=prompt,response=completion,system_prompt=system and --as-chat (the system prompt then opens each chat)"
    )
    columns = dict(pair.split("=") for pair in flags.split()[1].split(","))
    write_starter(tmp_path / "a.yaml", MODEL, str(data), None, "qv", None, None, columns=columns, as_chat=True)
    exp = load_experiment(tmp_path / "a.yaml")
    assert (exp.data.columns["system_prompt"], exp.data.as_chat) == ("system", True)
