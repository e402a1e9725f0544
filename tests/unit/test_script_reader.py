"""`tunelab init --from-script`: the mission's training scripts (tests/fixtures/scripts/, written as their user wrote
them) read into experiment files, never run; what they leave out is what the installed libraries default to."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from tests.conftest import CONFIGS, DATA, dataset_repository, run_cli
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan
from tunelab.recipe import read_command
from tunelab.report.terminal import print_starter
from tunelab.script import read_script
from tunelab.starter import starter_from_script, study_from_scripts

SCRIPTS = Path(__file__).parents[1] / "fixtures" / "scripts"
LLAMA = str(CONFIGS / "llama-3.1-8b-instruct")


def beside_its_data(tmp_path: Path, script: str) -> Path:
    """The script in a folder with the data it names (data/train.jsonl, data/eval.jsonl, data/pairs.jsonl)."""
    (tmp_path / "data").mkdir()
    for name, source in (("train", "sft_train"), ("eval", "sft_eval"), ("pairs", "pref_train")):
        shutil.copy(DATA / f"{source}.jsonl", tmp_path / "data" / f"{name}.jsonl")
    return Path(shutil.copy(SCRIPTS / script, tmp_path / script))


def read(tmp_path: Path, script: str, **flags):
    path = beside_its_data(tmp_path, script)
    flags = {"scope": None, "method": None, "name": None} | flags
    starter = starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, **flags)
    return starter, load_experiment(tmp_path / "exp.yaml")


def init_grpo(script: Path, experiment: Path):
    """init --from-script on a GRPO script, with the bundled GRPO prompts as its data, planned on Llama 3.1 8B."""
    prompts = str(DATA / "grpo_train.jsonl")
    return starter_from_script(experiment, script, LLAMA, prompts, None, scope=None, method=None, name=None)


def defaults(config: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(config)}


def test_train_lora_qv_is_the_experiment_it_defines(tmp_path: Path) -> None:
    starter, exp = read(tmp_path, "train_lora.py")
    lora = exp.scope.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets, lora.layers, lora.bias) == (
        16, 32, 0.05, ["q_proj", "v_proj"], "all", "none",
    )  # fmt: skip
    t = exp.train
    assert (t.learning_rate, t.epochs, t.batch_size, t.grad_accumulation, t.max_length) == (2e-4, 3, 4, 4, 1024)
    assert (t.logging_steps, t.pin_memory, exp.model.dtype, exp.method) == (10, "off", "bfloat16", "sft")
    assert (exp.name, exp.output.dir, Path(exp.data.train).name) == ("lora-qv", "outputs", "train.jsonl")
    assert starter.unread == [] and starter.trains == "LoRA r16 on q_proj, v_proj"


def test_the_last_half_variant_plans_the_layers_it_named_and_lists_what_it_computes(tmp_path: Path) -> None:
    from peft import LoraConfig

    starter, exp = read(tmp_path, "train_lora_last_half.py")
    assert (exp.scope.lora.layers, exp.scope.lora.layers_pattern) == (["16-31"], "layers")
    assert exp.scope.lora.dropout == defaults(LoraConfig)["lora_dropout"]  # left to PEFT's default
    assert Path(exp.data.eval).name == "eval.jsonl" and exp.train.seed == 7
    assert starter.unread == ["learning_rate (float(sys.argv[1]))"]
    plan = make_plan(exp)
    assert {m.split(".")[2] for m in plan.scope.lora_modules} == {str(i) for i in range(16, 32)}
    per_layer = 2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336)  # q, o; k, v; gate, up, down: in + out
    assert plan.scope.trainable_params == 16 * 16 * per_layer  # 16 layers, r 16


def test_another_model_trains_the_same_part_of_its_layers_or_init_says_why_not(tmp_path: Path, tiny_model_dir) -> None:
    """--model replacing the script's model: the last half of Llama-3.1-8B's 32 layers (16-31) is the last half of the
    built-in model's 4 (2-3), written as last-half; layers that are no such part, or of a model whose config cannot
    be read here (a hub id offline), and that the new model lacks, are one line."""
    script = beside_its_data(tmp_path, "train_lora_last_half.py")
    text = script.read_text()
    script.write_text(text.replace('"meta-llama/Llama-3.1-8B-Instruct"', repr(LLAMA)))
    flags = {"scope": None, "method": None, "name": None}
    starter = starter_from_script(tmp_path / "exp.yaml", script, "builtin:tiny-chat", None, None, **flags)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert exp.scope.lora.layers == "last-half" and "layers: last-half" in (tmp_path / "exp.yaml").read_text()
    assert {m.split(".")[2] for m in make_plan(exp).scope.lora_modules} == {"2", "3"}
    assert f"scope.lora.layers: last-half, the part of {LLAMA}'s 32 layers the script trains (16-31); on " in (
        " ".join(starter.notes)
    )
    script.write_text(text.replace('"meta-llama/Llama-3.1-8B-Instruct"', repr(LLAMA)).replace("16, 32", "12, 28"))
    with pytest.raises(
        TunelabError,
        match=r"^--model: .* layers 12-27 of .*llama-3.1-8b-instruct \(32 layers\), and "
        r"builtin:tiny-chat has 4 \(0-3\); give --scope with the part of this model to train",
    ):
        starter_from_script(tmp_path / "other.yaml", script, "builtin:tiny-chat", None, None, **flags)
    script.write_text(text)  # the hub id, which this machine cannot reach
    with pytest.raises(TunelabError, match=r"^--model: .*of meta-llama/Llama-3.1-8B-Instruct \(whose config this "):
        starter_from_script(tmp_path / "other.yaml", script, "builtin:tiny-chat", None, None, **flags)
    assert not (tmp_path / "other.yaml").exists()


def test_train_partial_ft_opens_what_its_requires_grad_lines_open(tmp_path: Path) -> None:
    from trl import SFTConfig

    starter, exp = read(tmp_path, "train_partial_ft.py")
    p = exp.scope.partial
    assert (p.last_blocks, p.norm, p.lm_head, exp.scope.lora) == (4, True, True, None)
    assert (exp.train.learning_rate, exp.train.epochs) == (5e-6, 2)
    sft = defaults(SFTConfig)  # what the script left out ran with TRL's defaults
    assert (exp.train.grad_accumulation, exp.train.max_length) == (
        sft["gradient_accumulation_steps"],
        sft["max_length"],
    )
    assert starter.trains == "the last 4 blocks, norm, lm_head"


def test_train_dpo_is_dpo_with_its_beta_and_trls_batch(tmp_path: Path) -> None:
    from trl import DPOConfig

    _, exp = read(tmp_path, "train_dpo.py")
    assert (exp.method, exp.dpo.beta, exp.scope.lora.r, exp.scope.lora.alpha) == ("dpo", 0.1, 8, 16)
    assert exp.scope.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert exp.train.batch_size == defaults(DPOConfig)["per_device_train_batch_size"]


def test_flags_override_the_script_and_values_that_do_not_validate_are_listed(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    text = path.read_text().replace('report_to="none"', 'lr_scheduler_type="warmup_stable_decay"')
    path.write_text(text.replace("num_train_epochs=3", "num_train_epochs=EPOCHS") + "\nopen('ran.txt', 'w')\n")
    starter = starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, scope="qkvo", method=None, name="x")
    exp = load_experiment(tmp_path / "exp.yaml")
    assert (exp.name, exp.scope.lora.targets, exp.scope.lora.r, exp.train.scheduler) == ("x", "qkvo", 16, "linear")
    assert starter.unread[0] == "num_train_epochs (EPOCHS)"
    assert starter.unread[1].startswith("train.scheduler: 'warmup_stable_decay' is not a choice; input should be")
    assert not (tmp_path / "ran.txt").exists()  # read, never run


def test_a_script_without_a_model_or_that_is_not_python_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "s.py").write_text("import trl\n")
    with pytest.raises(TunelabError, match=r"^--model: .*s.py names no model this reader can take as written"):
        starter_from_script(tmp_path / "e.yaml", tmp_path / "s.py", None, None, None, scope=None, method=None)
    (tmp_path / "s.py").write_text("x = (\n")
    with pytest.raises(TunelabError, match=r"^--from-script: .*s.py:1: not Python"):
        starter_from_script(tmp_path / "e.yaml", tmp_path / "s.py", LLAMA, None, None, scope=None, method=None)


def test_init_from_script_says_what_it_read_and_did_not(tmp_path: Path) -> None:
    script = beside_its_data(tmp_path, "train_lora_last_half.py")
    done = run_cli("init", "exp.yaml", "--from-script", str(script), "--model", LLAMA, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "LoRA r16 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, layers 16-31" in out
    assert "never run; not carried over: learning_rate (float(sys.argv[1]))" in out


def test_a_list_of_data_files_is_the_list_it_trains_on(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    path.write_text(
        path.read_text().replace(
            'DATA_PATH = "data/train.jsonl"', 'DATA_PATH = ["data/train.jsonl", "data/eval.jsonl"]'
        )
    )
    starter = starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert [Path(f).name for f in exp.data.train] == ["train.jsonl", "eval.jsonl"]
    lines = [(DATA / f"sft_{n}.jsonl").read_text().count("\n") for n in ("train", "eval")]
    assert starter.rows == sum(lines)  # both files' rows, as the run reads them


def test_a_qlora_script_is_its_4bit_base_its_eval_file_and_its_loss_on_replies(tmp_path: Path) -> None:
    starter, exp = read(tmp_path, "train_qlora.py")
    q = exp.model.quantization
    assert (q.bits, q.type, q.double_quant, q.compute_dtype) == (4, "nf4", True, "bfloat16")
    assert "    double_quant: true  #" in (tmp_path / "exp.yaml").read_text()  # a boolean, as written by hand
    assert (exp.model.dtype, exp.model.attn_implementation) == ("bfloat16", "sdpa")
    lora = exp.scope.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (64, 16, 0.1, "all-linear")
    t = exp.train
    assert (t.batch_size, t.grad_accumulation, t.gradient_checkpointing, t.optimizer) == (
        2,
        8,
        "on",
        "paged_adamw_32bit",
    )
    assert (t.max_grad_norm, t.warmup, t.scheduler, t.max_length) == (0.3, 0.03, "constant", 2048)
    assert (Path(exp.data.train).name, Path(exp.data.eval).name, exp.data.eval_fraction) == (
        "train.jsonl",
        "eval.jsonl",
        None,
    )
    assert exp.data.loss_on == "replies"  # assistant_only_loss=True
    assert (exp.name, exp.output.dir) == ("llama-3.1-8b-qlora", "checkpoints")
    assert starter.unread == [] and starter.notes == []  # the script evaluated, and on its replies only
    console = Console(record=True, width=10_000)
    print_starter(starter, console)
    said = " ".join(console.export_text().split())
    assert "LoRA r64 on all-linear of " + LLAMA + " (4-bit nf4 double-quant), learning rate" in said


def test_a_bitsandbytes_config_that_leaves_settings_out_ran_with_transformers_defaults(tmp_path: Path) -> None:
    from transformers import BitsAndBytesConfig

    path = beside_its_data(tmp_path, "train_qlora.py")
    text = path.read_text()
    start, end = text.index("bnb_config = BitsAndBytesConfig("), text.index("model = AutoModelForCausalLM")
    path.write_text(text[:start] + "bnb_config = BitsAndBytesConfig(load_in_4bit=True)\n" + text[end:])
    starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    q = load_experiment(tmp_path / "exp.yaml").model.quantization
    default = BitsAndBytesConfig(load_in_4bit=True)
    assert (q.type, q.double_quant) == (default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant)
    assert q.compute_dtype == str(default.bnb_4bit_compute_dtype).removeprefix("torch.")
    assert q.type != type(q)(bits=4).type  # transformers' fp4, not tunelab's nf4: the script's run, not init's
    path.write_text(text[:start] + "bnb_config = BitsAndBytesConfig(load_in_8bit=True)\n" + text[end:])
    starter_from_script(tmp_path / "e8.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    assert load_experiment(tmp_path / "e8.yaml").model.quantization.bits == 8


def test_trl_sft_trains_chats_on_every_token_and_prompt_completion_rows_on_the_completion(tmp_path: Path) -> None:
    from trl import SFTConfig

    sft = defaults(SFTConfig)  # the rule follows TRL's own defaults: both off means the whole chat carries loss
    assert (sft["assistant_only_loss"], sft["completion_only_loss"]) == (False, None)
    starter, exp = read(tmp_path, "train_lora.py")  # messages rows, neither setting given
    assert exp.data.loss_on == "all"
    assert [n.split(",")[0] for n in starter.notes] == [
        "data.loss_on: all",
        "data.eval_fraction: 0.05 is init's: the script evaluated on no held-out rows",
    ]
    rows = [{"prompt": "What is the capital of Molo?", "completion": "Tam."}] * 20
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    starter = starter_from_script(
        tmp_path / "pc.yaml", tmp_path / "train_lora.py", LLAMA, None, None, scope=None, method=None, name=None
    )
    assert (starter.data_format, load_experiment(tmp_path / "pc.yaml").data.loss_on) == ("prompt_completion", "replies")
    script = tmp_path / "train_lora.py"
    script.write_text(script.read_text().replace("bf16=True,", "bf16=True, completion_only_loss=False,"))
    starter_from_script(tmp_path / "all.yaml", script, LLAMA, None, None, scope=None, method=None, name=None)
    assert load_experiment(tmp_path / "all.yaml").data.loss_on == "all"


def test_a_hub_dataset_script_reads_its_model_its_splits_and_what_it_slices(tmp_path: Path) -> None:
    chats = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    dataset_repository(tmp_path / "ultrachat", {"train_sft": chats[:30], "test_sft": chats[30:40]})
    script = Path(shutil.copy(SCRIPTS / "sft_hub.py", tmp_path / "sft_hub.py"))
    assert read_script(script).model == "Qwen/Qwen2.5-0.5B-Instruct"  # SFTTrainer(model="org/name")
    starter = starter_from_script(tmp_path / "exp.yaml", script, LLAMA, None, None, scope=None, method=None, name=None)
    d = load_experiment(tmp_path / "exp.yaml").data
    assert (Path(d.train).name, d.hub_split, Path(d.eval).name, d.eval_split) == (
        "ultrachat",
        "train_sft",
        "ultrachat",
        "test_sft",
    )
    assert starter.rows == 30 and starter.unread == []
    # SFTTrainer given no config ran with SFTConfig's defaults, not init's
    from trl import SFTConfig

    t, trl_defaults = load_experiment(tmp_path / "exp.yaml").train, defaults(SFTConfig)
    assert (t.learning_rate, t.batch_size, t.epochs, t.max_length) == (
        trl_defaults["learning_rate"], trl_defaults["per_device_train_batch_size"],
        trl_defaults["num_train_epochs"], trl_defaults["max_length"],
    )  # fmt: skip
    script.write_text(script.read_text().replace('split="train_sft"', 'split="train_sft[:500]"'))
    read = read_script(script)
    assert read.split == "train_sft"
    assert read.unread == [
        "the split 'train_sft[:500]' (tunelab reads a whole split, or a seeded random part: {path, split, rows})"
    ]


def test_a_split_held_out_by_train_test_split_is_the_eval_fraction(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    text = path.read_text().replace('split="train")', 'split="train").train_test_split(test_size=0.1, seed=0)')
    path.write_text(text)
    starter = starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    assert load_experiment(tmp_path / "exp.yaml").data.eval_fraction == 0.1
    assert not any("eval_fraction" in n for n in starter.notes)
    path.write_text(text.replace("test_size=0.1", "test_size=200"))
    assert read_script(path).unread == [
        "train_test_split's test_size (200; tunelab holds out a fraction: data.eval_fraction)"
    ]


def test_a_trainer_script_that_labels_every_token_and_names_its_eval_file_eval(tmp_path: Path) -> None:
    beside_its_data(tmp_path, "train_lora.py")
    script = tmp_path / "train_plain.py"
    script.write_text(
        "from datasets import load_dataset\n"
        "from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments\n"
        "model = AutoModelForCausalLM.from_pretrained('meta-llama/Llama-3.1-8B-Instruct')\n"
        "TRAIN, EVAL = 'data/train.jsonl', 'data/eval.jsonl'\n"
        "ds = load_dataset('json', data_files={'train': TRAIN, 'eval': EVAL})\n"
        "collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)\n"
        "args = TrainingArguments(output_dir='out/plain', learning_rate=1e-5)\n"
        "Trainer(model=model, args=args, train_dataset=ds['train'], eval_dataset=ds['eval'], data_collator=collator)\n"
    )
    starter = starter_from_script(tmp_path / "exp.yaml", script, LLAMA, None, None, scope=None, method=None, name=None)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert (exp.data.loss_on, Path(exp.data.eval).name, exp.scope.full, exp.train.learning_rate) == (
        "all", "eval.jsonl", True, 1e-5,
    )  # fmt: skip
    assert starter.notes == []  # it said what carries the loss, and evaluated


def test_a_chat_template_the_script_sets_is_the_one_it_trains_with_and_its_own_formatting_is_named(
    tmp_path: Path,
) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    template = (CONFIGS.parent / "chat_models" / "zephyr-7b-beta.jinja").read_text()
    text = path.read_text().replace(
        "tokenizer.pad_token = tokenizer.eos_token\n", "tokenizer.chat_template = TEMPLATE\n"
    )
    path.write_text(f"TEMPLATE = {template!r}\n" + text)
    starter_from_script(tmp_path / "exp.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    assert load_experiment(tmp_path / "exp.yaml").tokenizer.chat_template == template
    path.write_text(
        text.replace("peft_config=lora_config,", "peft_config=lora_config, formatting_func=to_text,")
        + "clone_chat_template(model, tokenizer, 'Qwen/Qwen3-0.6B')\n"
    )
    unread = read_script(path).unread
    assert [u.split(" (")[0] for u in unread] == [
        "formatting_func",
        "the chat template clone_chat_template gives",
        "the chat template",
    ]


def test_a_trl_recipe_is_its_qlora_sft_as_trl_sft_runs_it(tmp_path: Path) -> None:
    recipe = tmp_path / "recipes" / "llama-3.1-8b" / "sft" / "config_qlora.yaml"
    recipe.parent.mkdir(parents=True)
    shutil.copy(SCRIPTS / "recipes" / "llama-3.1-8b" / "sft" / "config_qlora.yaml", recipe)
    chats = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    dataset_repository(recipe.parent / "ultrachat", {"train_sft": chats[:30], "test_sft": chats[30:40]})
    starter = starter_from_script(tmp_path / "exp.yaml", recipe, None, None, None, scope=None, method=None, name=None)
    exp = load_experiment(tmp_path / "exp.yaml")
    assert (exp.model.id, exp.model.dtype, exp.model.attn_implementation, exp.method) == (
        "meta-llama/Llama-3.1-8B-Instruct", "bfloat16", "sdpa", "sft",
    )  # fmt: skip
    q = exp.model.quantization  # TRL's get_quantization_config: its quant type, nested quant, the model's dtype
    assert (q.bits, q.type, q.double_quant, q.compute_dtype) == (4, "nf4", True, "bfloat16")
    lora = exp.scope.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (32, 16, 0.1, "all-linear")
    d = exp.data
    assert (Path(d.train).name, d.hub_split, Path(d.eval).name, d.eval_split) == (
        "ultrachat", "train_sft", "ultrachat", "test_sft",
    )  # fmt: skip
    t = exp.train
    assert (t.learning_rate, t.epochs, t.batch_size, t.grad_accumulation, t.max_length) == (2e-4, 1, 4, 2, 2048)
    assert (t.scheduler, t.warmup, t.gradient_checkpointing, t.seed) == ("cosine", 0.1, "on", 42)
    assert (exp.name, exp.output.dir, d.loss_on) == ("llama-3.1-8b-sft-qlora", "data", "all")
    assert starter.unread == [] and [n.split(",")[0] for n in starter.notes] == ["data.loss_on: all"]


def test_a_shell_scripts_trl_command_line_is_read_with_trls_defaults_for_what_it_leaves_out(tmp_path: Path) -> None:
    from trl import DPOConfig, ModelConfig

    pairs = [json.loads(line) for line in (DATA / "pref_train.jsonl").read_text().splitlines()]
    dataset_repository(tmp_path / "data" / "pairs", {"train": pairs})
    script = Path(shutil.copy(SCRIPTS / "train_dpo.sh", tmp_path / "train_dpo.sh"))
    starter = starter_from_script(tmp_path / "exp.yaml", script, LLAMA, None, None, scope=None, method=None, name=None)
    exp = load_experiment(tmp_path / "exp.yaml")
    model, dpo = defaults(ModelConfig), defaults(DPOConfig)
    assert (exp.method, exp.dpo.beta, exp.train.learning_rate) == ("dpo", 0.05, 5e-7)
    lora = exp.scope.lora  # what --use_peft leaves out is ModelConfig's, which TRL passes to LoraConfig
    assert (lora.r, lora.alpha, lora.dropout) == (model["lora_r"], model["lora_alpha"], model["lora_dropout"])
    assert lora.targets == ["q_proj", "v_proj"] and exp.model.dtype == model["dtype"]
    assert (exp.train.batch_size, exp.train.epochs) == (dpo["per_device_train_batch_size"], dpo["num_train_epochs"])
    assert (exp.name, exp.output.dir, exp.model.quantization) == ("dpo-qv", "outputs", None)
    assert starter.unread == ["max_steps ($STEPS)"]
    flags = "--model_name_or_path m --dataset_name=data/pairs --no-such-flag --use_peft true --lora_target_modules all-linear"
    script.write_text(f"python trl/scripts/dpo.py --config missing.yaml {flags}\n")
    read = read_command(script)
    assert (read.method, read.model, read.data, read.settings["scope.lora.targets"]) == (
        "dpo", "m", "data/pairs", "all-linear",
    )  # fmt: skip
    assert read.unread == ["the recipe missing.yaml (not found beside train_dpo.sh or here)"]
    script.write_text("echo nothing to train\n")
    with pytest.raises(TunelabError, match=r"^--from-script: .*train_dpo.sh runs no `trl sft\|dpo\|kto\|reward`"):
        read_command(script)


def test_a_script_driven_by_its_command_line_is_read_with_the_defaults_a_run_without_flags_has(
    tmp_path: Path,
) -> None:
    starter, exp = read(tmp_path, "train_lora_args.py")
    assert read_script(tmp_path / "train_lora_args.py").model == "meta-llama/Llama-3.1-8B-Instruct"  # --model_name
    assert Path(exp.data.train).name == "train.jsonl"
    t = exp.train  # "1e-4" typed by type=float, as argparse types a string default; --no-pin-memory's store_false
    assert (t.learning_rate, t.epochs, t.batch_size, t.pin_memory) == (1e-4, 2, 2, "on")
    lora = exp.scope.lora  # a dataclass's field(default=...), plain defaults and a lambda's list
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (8, 16, 0.1, ["q_proj", "v_proj"])
    assert starter.unread == [] and starter.trains == "LoRA r8 on q_proj, v_proj"
    assert (exp.name, exp.output.dir) == ("lora-args", "outputs")
    assert starter.notes[0].startswith(
        "read as the defaults of the script's command line (a run with no flags): model_name="
        "meta-llama/Llama-3.1-8B-Instruct, train_file=data/train.jsonl, lora_r=8, lora_alpha=16, "
    )


def test_a_branch_the_scripts_defaults_decide_is_the_one_read(tmp_path: Path) -> None:
    """The shape of TRL's early examples/scripts/sft.py: `if script_args.use_peft:` builds the LoraConfig, and
    use_peft defaults to False, so a run with no flags fine-tunes every weight; load_in_4bit likewise."""
    beside_its_data(tmp_path, "train_lora.py")
    script = tmp_path / "sft.py"
    script.write_text(
        "from dataclasses import dataclass, field\n"
        "@dataclass\nclass ScriptArguments:\n"
        "    model_name: str = field(default='meta-llama/Llama-3.1-8B-Instruct')\n"
        "    use_peft: bool = field(default=False)\n    load_in_4bit: bool = False\n    max_steps: int = -1\n"
        "script_args = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses()[0]\n"
        "if script_args.load_in_4bit and not script_args.use_peft:\n    raise ValueError('4-bit trains adapters')\n"
        "elif script_args.load_in_4bit:\n    quantization_config = BitsAndBytesConfig(load_in_4bit=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(script_args.model_name)\n"
        "dataset = load_dataset('json', data_files='data/train.jsonl', split='train')\n"
        "args = TrainingArguments(output_dir='out', max_steps=script_args.max_steps)\n"
        "if script_args.use_peft:\n    peft_config = LoraConfig(r=64)\nelse:\n    peft_config = None\n"
        "SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=peft_config).train()\n"
    )
    read = read_script(script)
    assert (read.scope, read.settings.get("scope.lora.r"), read.settings.get("model.quantization.bits")) == (
        "full-ft", None, None,
    )  # fmt: skip
    assert "train.max_steps" not in read.settings  # -1: no limit
    script.write_text(script.read_text().replace("use_peft: bool = field(default=False)", "use_peft: bool = True"))
    read = read_script(script)
    assert (read.scope, read.settings["scope.lora.r"]) == ("all-linear", 64)


def test_a_notebook_is_read_from_its_code_cells_past_its_shell_lines(tmp_path: Path) -> None:
    """A Colab notebook: `!pip install` and `%env` lines beside the code, and rows reformatted by a .map()."""
    beside_its_data(tmp_path, "train_lora.py")
    script = (tmp_path / "train_lora.py").read_text()
    cells = [
        {"cell_type": "markdown", "source": ["# QLoRA on Llama\n"]},
        {"cell_type": "code", "source": ["!pip install -q trl peft\n", "%env WANDB_DISABLED=true\n"]},
        {"cell_type": "code", "source": script.replace("dataset = load", "raw = load").replace(
            'split="train")', 'split="train")\ndataset = raw.map(to_text, remove_columns=raw.column_names)\nheld = raw.map(to_text)')},
    ]  # fmt: skip
    notebook = tmp_path / "train.ipynb"
    notebook.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    starter = starter_from_script(
        tmp_path / "exp.yaml", notebook, LLAMA, None, None, scope=None, method=None, name=None
    )
    exp = load_experiment(tmp_path / "exp.yaml")
    assert (exp.scope.lora.targets, exp.train.epochs, Path(exp.data.train).name) == (
        ["q_proj", "v_proj"],
        3,
        "train.jsonl",
    )
    assert [u.split(" (")[0] for u in starter.unread] == ["the rows as to_text rewrites them"]
    exported = tmp_path / "exported.py"  # the same code as a .py export keeps it, magics and all
    exported.write_text("!pip install -q trl\n" + script)
    assert read_script(exported).settings["scope.lora.targets"] == ["q_proj", "v_proj"]
    notebook.write_text("{not json")
    with pytest.raises(TunelabError, match=r"^--from-script: .*train.ipynb: not a Jupyter notebook this reader takes"):
        read_script(notebook)


def test_an_unsloth_notebook_is_its_4bit_base_lora_and_loss_on_replies_with_unsloths_defaults(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    starter, exp = read(tmp_path, "unsloth_llama31.py")
    assert read_script(tmp_path / "unsloth_llama31.py").model == "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    q = exp.model.quantization  # load_in_4bit is Unsloth's default; its loader's nf4, double quant, model dtype
    assert (q.bits, q.type, q.double_quant, q.compute_dtype, exp.model.dtype) == (4, "nf4", True, "auto", "auto")
    lora = exp.scope.lora  # lora_dropout 0 and the seed 3407 are get_peft_model's defaults, which it left out
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (16, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    t = exp.train
    assert (t.max_length, t.gradient_checkpointing, t.seed, t.optimizer) == (2048, "on", 3407, "adamw_8bit")
    assert (t.batch_size, t.grad_accumulation, t.warmup, t.weight_decay) == (2, 4, 5, 0.01)
    assert t.learning_rate == 2e-4 and t.learning_rate != TrainingArguments.learning_rate
    assert exp.data.loss_on == "replies"  # train_on_responses_only
    assert [u.split(" (")[0] for u in starter.unread] == ["the chat template Unsloth's get_chat_template names"]
    assert (exp.name, exp.output.dir) == ("unsloth-llama31", "outputs")  # output_dir="outputs" names no experiment


def test_a_setting_that_changes_training_and_has_no_key_is_named_unless_it_is_the_librarys_default(
    tmp_path: Path,
) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    original = path.read_text()
    text = original.replace('bias="none",', 'bias="none", lora_bias=True, init_lora_weights="corda",')
    path.write_text(text.replace("bf16=True,", "bf16=True, neftune_noise_alpha=5, adam_beta1=0.9, save_steps=50,"))
    read = read_script(path)
    assert read.unread == [
        "lora_bias=True (no experiment key: the written experiment trains without it)",
        "init_lora_weights='corda' (not an init tunelab runs: the written experiment trains without it)",
    ]  # adam_beta1=0.9 is TrainingArguments' own default; save_steps and neftune_noise_alpha have their keys
    assert read.settings["train.neftune"] == 5
    # EVA is init: eva, and the rank it would move between layers (PEFT's rho, 2 unless given) is named
    for config, shown in (
        ("", "PEFT's default EvaConfig(), rho 2"),
        (" eva_config=EvaConfig(rho=4),", "EvaConfig(rho=4)"),
    ):
        path.write_text(original.replace('bias="none",', f'bias="none", init_lora_weights="eva",{config}'))
        read = read_script(path)
        assert read.settings["scope.lora.init"] == "eva"
        assert read.unread == [
            f"eva_config ({shown}): tunelab's EVA keeps rank r in every layer (rho 1), where a rho above 1 moves rank "
            "to the layers whose inputs vary most"
        ]
    for written, init in (('"pissa_niter_16"', "pissa_niter_16"), ("True", "default"), ("False", None)):
        path.write_text(original.replace('bias="none",', f'bias="none", init_lora_weights={written},'))
        read = read_script(path)
        assert read.settings.get("scope.lora.init") == init, written
        unread = "init_lora_weights=False (not an init tunelab runs: the written experiment trains without it)"
        assert read.unread == ([] if init else [unread])


def test_a_recipes_dataset_mixture_is_the_list_of_sources_it_trains_on(tmp_path: Path) -> None:
    chats = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text().splitlines()]
    dataset_repository(tmp_path / "general", {"train": chats[:20]})
    dataset_repository(tmp_path / "code", {"train_sft": chats[20:30]})
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(
        "model_name_or_path: meta-llama/Llama-3.1-8B-Instruct\n"
        f"datasets:\n- path: {tmp_path / 'general'}\n  fraction: 0.7\n"
        f"- path: {tmp_path / 'code'}\n  split: train_sft\n  fraction: 0.3\n"
        "test_split_size: 0.1\n"
    )
    starter = starter_from_script(tmp_path / "exp.yaml", recipe, LLAMA, None, None, scope=None, method=None, name=None)
    d = load_experiment(tmp_path / "exp.yaml").data
    assert [(Path(s.path).name, s.split) for s in d.train] == [("general", "train"), ("code", "train_sft")]
    assert d.eval_fraction == 0.1 and starter.notes[-1].startswith("data.loss_on: all")  # the mixture's held-out part
    assert [u.split(" (")[0] for u in starter.unread] == [
        f"fraction 0.7 of {tmp_path / 'general'}",
        f"fraction 0.3 of {tmp_path / 'code'}",
    ]


def test_data_a_script_reads_from_another_machine_is_asked_for_in_one_line(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_qlora.py")
    path.write_text(path.read_text().replace('"data/train.jsonl"', '"/content/drive/train.jsonl"'))
    with pytest.raises(
        TunelabError,
        match=r"^--data: train_qlora.py reads '/content/drive/train.jsonl', which is not here; give --data",
    ):
        starter_from_script(tmp_path / "e.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    here = str(tmp_path / "data" / "train.jsonl")
    starter_from_script(tmp_path / "e.yaml", path, LLAMA, here, None, scope=None, method=None, name=None)
    assert Path(load_experiment(tmp_path / "e.yaml").data.eval).name == "eval.jsonl"  # still the script's eval file
    path.write_text(path.read_text().replace('"data/eval.jsonl"', '"/content/drive/eval.jsonl"'))
    with pytest.raises(
        TunelabError, match=r"^--eval: train_qlora.py reads '/content/drive/eval.jsonl', which is not here"
    ):
        starter_from_script(tmp_path / "e2.yaml", path, LLAMA, here, None, scope=None, method=None, name=None)


def test_weights_opened_by_a_rule_the_reader_cannot_follow_ask_for_the_scope(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_partial_ft.py")
    text = path.read_text()
    start = text.index("for p in model.parameters():")
    end = text.index("args = ", start)
    rule = (
        "for name, param in model.named_parameters():\n"
        "    param.requires_grad = any(f'layers.{i}.' in name for i in range(28, 32)) or 'lm_head' in name\n"
    )
    path.write_text(text[:start] + rule + text[end:])
    with pytest.raises(
        TunelabError,
        match=r"^--scope: train_partial_ft.py opens weights by a rule this reader does not follow \(requires_grad = any\(",
    ):
        starter_from_script(tmp_path / "e.yaml", path, LLAMA, None, None, scope=None, method=None, name=None)
    starter_from_script(tmp_path / "e.yaml", path, LLAMA, None, None, scope="partial-last4", method=None, name=None)
    assert load_experiment(tmp_path / "e.yaml").scope.partial.last_blocks == 4


def test_trls_grpo_quickstart_is_grpo_with_its_reward_and_grpoconfigs_defaults(tmp_path: Path) -> None:
    from trl import GRPOConfig

    script = Path(shutil.copy(SCRIPTS / "grpo_quickstart.py", tmp_path / "grpo_quickstart.py"))
    starter = init_grpo(script, tmp_path / "exp.yaml")
    exp, trl_defaults = load_experiment(tmp_path / "exp.yaml"), defaults(GRPOConfig)
    assert read_script(script).model == "Qwen/Qwen2-0.5B-Instruct"  # GRPOTrainer(model="org/name")
    assert (exp.method, exp.grpo.rewards, exp.scope.kind, starter.unread) == (
        "grpo",
        ["trl:accuracy_reward"],
        "full",
        [],
    )
    t, g = exp.train, exp.grpo
    assert (t.learning_rate, t.batch_size, t.epochs, g.generations, g.max_completion_length) == (
        trl_defaults["learning_rate"], trl_defaults["per_device_train_batch_size"], trl_defaults["num_train_epochs"],
        trl_defaults["num_generations"], trl_defaults["max_completion_length"],
    )  # fmt: skip


def test_a_gspo_script_is_grpo_with_sequence_ratios_and_names_what_it_sets_without_a_key(tmp_path: Path) -> None:
    """TRL's GSPO recipe: GRPOConfig with sequence-level importance sampling and its tiny clipping range."""
    script = tmp_path / "train_gspo.py"
    script.write_text(
        "from trl import GRPOConfig, GRPOTrainer\n"
        "from trl.rewards import think_format_reward\n"
        "args = GRPOConfig(importance_sampling_level='sequence', loss_type='grpo', beta=0.0, epsilon=3e-4,\n"
        "                  epsilon_high=4e-4, steps_per_generation=4, top_k=50, repetition_penalty=1.0)\n"
        "GRPOTrainer(model='Qwen/Qwen3-0.6B', reward_funcs=think_format_reward, args=args, train_dataset=ds).train()\n"
    )
    starter = init_grpo(script, tmp_path / "exp.yaml")
    g = starter.exp.grpo
    assert (g.importance_sampling_level, g.loss_type, g.beta, g.epsilon, g.epsilon_high) == (
        "sequence",
        "grpo",
        0,
        3e-4,
        4e-4,
    )
    # what changes training and has no key is named; repetition_penalty=1.0 is GRPOConfig's default, so it is not
    assert starter.unread == [
        "steps_per_generation=4 (no experiment key: the written experiment trains without it)",
        "top_k=50 (no experiment key: the written experiment trains without it)",
    ]
    assert "loss grpo; one policy ratio per reply (GSPO)" in make_plan(starter.exp).method_line


def test_a_grpo_scripts_own_rewards_and_tools_are_copied_beside_the_experiment_and_load(tmp_path: Path) -> None:
    from tunelab.rewards import load_rewards, load_tools

    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "grpo_train.jsonl", tmp_path / "data" / "prompts.jsonl")
    script = Path(shutil.copy(SCRIPTS / "train_grpo_tools.py", tmp_path / "train_grpo_tools.py"))
    out = tmp_path / "experiments"
    flags = dict(scope=None, method=None, name=None)
    starter = starter_from_script(out / "exp.yaml", script, LLAMA, None, None, **flags)
    exp = load_experiment(out / "exp.yaml")
    copied = out / "train_grpo_tools_rewards.py"
    g, t, lora = exp.grpo, exp.train, exp.scope.lora
    assert g.rewards == [f"{copied}:correct_capital", "trl:think_format_reward"] and g.tools == [f"{copied}:capital_of"]
    assert (g.generations, g.max_completion_length, g.tool_rounds) == (4, 128, 2)
    assert (t.learning_rate, t.batch_size, exp.model.dtype, exp.name) == (1e-5, 8, "bfloat16", "grpo-tools")
    assert (lora.r, lora.alpha, lora.targets) == (16, 32, "all-linear") and starter.unread == []
    assert any(n.startswith("correct_capital, capital_of copied from the script into") for n in starter.notes)
    # the copy holds the functions and what they use (the table, the pattern and its import, the helper), and none
    # of the training: it imports without loading a dataset or a model
    text = copied.read_text()
    assert "CAPITALS = {" in text and "import re" in text and "def _answer" in text
    assert (
        "load_dataset" not in text and "GRPOTrainer" not in text and "MODEL" not in text and "import json" not in text
    )
    (reward,) = load_rewards(g.rewards[:1])
    answers = [[{"role": "assistant", "content": f"The capital of Molo is {c}."}] for c in ("Vevasmo", "Loduve")]
    assert reward(prompts=[[], []], completions=answers, country=["Molo", "Molo"]) == [1.0, 0.0]
    (tool,) = load_tools(g.tools)
    assert tool("Lozin") == "Loduve"
    assert "replies may call capital_of (up to 2 rounds" in make_plan(exp).method_line
    # a second experiment from it into the same folder would replace the copy: refused, and nothing written
    with pytest.raises(TunelabError, match="train_grpo_tools_rewards.py: already exists"):
        starter_from_script(out / "again.yaml", script, LLAMA, None, None, **flags)
    assert not (out / "again.yaml").exists() and copied.read_text() == text
    # a study that fails at a later script leaves no copy behind either
    with pytest.raises(TunelabError, match="nothere.py' not found"):
        study_from_scripts(
            tmp_path / "s" / "ladder.yaml", [script, tmp_path / "nothere.py"], LLAMA, None, None, **flags
        )
    assert not (tmp_path / "s" / "train_grpo_tools_rewards.py").exists()


ENVIRONMENT_SCRIPT = '''from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer

CAPITALS = {"Molo": "Vevasmo", "Lozin": "Loduve"}


class Atlas:
    """Each rollout's atlas: it rewards exactly one look-up."""

    def reset(self, **kwargs):
        self.calls = 0

    def capital_of(self, country: str) -> str:
        """The capital city of a country.

        Args:
            country: The country's name.
        """
        self.calls += 1
        return CAPITALS.get(country, "unknown")

    def get_reward(self) -> float:
        return float(self.calls == 1)


def answers(completions, **kwargs):
    return [1.0 if "Vevasmo" in c[-1]["content"] else 0.0 for c in completions]


dataset = load_dataset("json", data_files="data/prompts.jsonl", split="train")
trainer = GRPOTrainer(
    model="meta-llama/Llama-3.1-8B-Instruct",
    reward_funcs=answers,
    args=GRPOConfig(output_dir="outputs/atlas", num_generations=4),
    train_dataset=dataset,
    environment_factory=Atlas,
)
trainer.train()
'''


def test_a_grpo_scripts_environment_class_is_copied_and_named(tmp_path: Path) -> None:
    """TRL's environment_factory=Atlas, a class the script defines: copied beside the experiment with what it uses,
    named in grpo.environment, and read back as the environment whose methods the prompts describe; a factory that is
    not such a class is listed as not carried over."""
    from tunelab.rewards import environment_schemas, load_environment

    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "grpo_train.jsonl", tmp_path / "data" / "prompts.jsonl")
    script = tmp_path / "train_atlas.py"
    script.write_text(ENVIRONMENT_SCRIPT)
    flags = dict(scope=None, method=None, name=None)
    starter = starter_from_script(tmp_path / "exp.yaml", script, LLAMA, None, None, **flags)
    exp = load_experiment(tmp_path / "exp.yaml")
    copied = tmp_path / "train_atlas_rewards.py"
    assert exp.grpo.environment == f"{copied}:Atlas" and exp.grpo.rewards == [f"{copied}:answers"]
    assert starter.unread == [] and "CAPITALS = {" in copied.read_text() and "GRPOTrainer" not in copied.read_text()
    atlas = load_environment(exp.grpo.environment)()
    atlas.reset(country="Molo")
    assert (atlas.capital_of("Lozin"), atlas.get_reward()) == ("Loduve", 1.0)
    assert [s["function"]["name"] for s in environment_schemas(exp.grpo.environment)] == ["capital_of"]
    assert "replies may act in Atlas (one each)" in make_plan(exp).method_line
    script.write_text(ENVIRONMENT_SCRIPT.replace("environment_factory=Atlas", "environment_factory=lambda: Atlas()"))
    starter = starter_from_script(tmp_path / "other" / "exp.yaml", script, LLAMA, None, None, **flags)
    assert load_experiment(tmp_path / "other" / "exp.yaml").grpo.environment is None
    assert starter.unread == [
        "environment_factory lambda: Atlas() (not a class the script defines at its top level; name the environment's "
        "class in grpo.environment as file.py:Class)"
    ]


def test_a_copied_reward_gets_the_tokenizer_alone_and_what_loads_data_is_named(tmp_path: Path) -> None:
    """Unsloth's GRPO notebooks score a reply's length with the tokenizer they load beside the model: the copy loads
    that tokenizer alone; a name bound by loading data is left out and named."""
    import ast

    script = tmp_path / "unsloth_grpo.py"
    script.write_text(
        "from unsloth import FastLanguageModel\n"
        "from datasets import load_dataset\n"
        "from trl import GRPOConfig, GRPOTrainer\n"
        'model, tokenizer = FastLanguageModel.from_pretrained("unsloth/Qwen3-4B-Base", max_seq_length=2048)\n'
        "model = FastLanguageModel.get_peft_model(model, r=16)\n"
        'answers = load_dataset("openai/gsm8k", "main", split="test")\n'
        "def short(completions, **kwargs):\n"
        '    return [float(len(tokenizer(c[0]["content"])["input_ids"]) < 200) for c in completions]\n'
        "def known(completions, **kwargs):\n"
        '    return [float(c[0]["content"] in answers["answer"]) for c in completions]\n'
        "trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[short, known],\n"
        "                      args=GRPOConfig(output_dir='outputs'), train_dataset=answers)\n"
        "trainer.train()\n"
    )
    starter = init_grpo(script, tmp_path / "exp.yaml")
    text = (tmp_path / "unsloth_grpo_rewards.py").read_text()
    ast.parse(text)
    assert "tokenizer = AutoTokenizer.from_pretrained('unsloth/Qwen3-4B-Base')" in text
    assert "FastLanguageModel" not in text and "load_dataset" not in text and "def known" in text
    assert starter.unread == [
        "answers, which the copied functions use: the script binds it by load_dataset('openai/gsm8k', 'main', "
        "split='test'), which loads a model, data or a trainer, so unsloth_grpo_rewards.py leaves it out; define it there"
    ]
    # without get_peft_model the script fine-tunes its 4-bit base whole, which cannot train: the quantization (its
    # settings together) is what is left out and named, and the rest of the script's settings stay
    script.write_text(script.read_text().replace("model = FastLanguageModel.get_peft_model(model, r=16)\n", ""))
    (tmp_path / "unsloth_grpo_rewards.py").unlink()
    starter = init_grpo(script, tmp_path / "full.yaml")
    assert starter.unread[1:] == [
        "model.quantization: a quantized base cannot train a full scope (its weights are packed integers that take no "
        "gradient); use scope: lora, or remove model.quantization"
    ]
    assert starter.exp.train.max_length == 2048 and starter.exp.train.learning_rate == 1e-6  # Unsloth's, GRPOConfig's


@pytest.mark.parametrize(
    "script",
    ["train_lora.py", "train_lora_last_half.py", "train_partial_ft.py", "train_dpo.py", "train_qlora.py"]
    + ["train_lora_args.py", "unsloth_llama31.py"],
)
def test_every_script_fixture_writes_an_experiment_that_plans_on_llama_31_8b(script: str, tmp_path: Path) -> None:
    """What init writes from each script is an experiment plan resolves on the mission's model: its scope's
    modules, counts and memory, from the config alone."""
    _, exp = read(tmp_path, script)
    plan = make_plan(exp)
    assert plan.scope.trainable_params > 0 and plan.model.layers == 32
    if exp.scope.lora is not None:
        assert plan.scope.lora_modules and all(".layers." in m for m in plan.scope.lora_modules)


def test_trls_own_scripts_point_to_the_recipe_or_command_line_they_ran_with(tmp_path: Path) -> None:
    import trl

    script = Path(trl.__file__).parent / "scripts" / "sft.py"  # the installed TRL's, driven by TrlParser
    with pytest.raises(TunelabError, match=r"^--from-script: sft.py takes its settings from TRL's command line"):
        starter_from_script(tmp_path / "e.yaml", script, None, None, None, scope=None, method=None, name=None)


def test_a_set_of_scripts_is_a_study_whose_every_variant_is_the_experiment_its_script_writes(tmp_path: Path) -> None:
    """The mission's ladder: train_lora.py, its last-half variant, train_partial_ft.py and train_dpo.py as one study;
    each variant resolves to exactly the experiment `init --from-script` writes from its script alone."""
    from tunelab.starter import study_from_scripts
    from tunelab.study import load_study, variant_experiment

    beside_its_data(tmp_path, "train_lora.py")
    names = ["train_lora.py", "train_lora_last_half.py", "train_partial_ft.py", "train_dpo.py"]
    scripts = [Path(shutil.copy(SCRIPTS / name, tmp_path / name)) for name in names]
    flags = {"scope": None, "method": None, "name": None}
    made = study_from_scripts(tmp_path / "ladder.yaml", scripts, LLAMA, None, None, **flags)
    study = load_study(tmp_path / "ladder.yaml")
    assert list(study.spec.variants) == ["lora-qv", "lora-last-half", "partial-ft", "dpo"] == list(made.variants)
    assert study.spec.variants["lora-qv"].set == {}  # the first script is the base
    assert "scope" in study.spec.variants["partial-ft"].set  # partial beside LoRA: the scope whole

    def settings(exp) -> dict:
        return exp.model_dump(mode="json", exclude={"name", "output"})

    for script, variant in zip(scripts, study.spec.variants, strict=True):
        starter_from_script(tmp_path / f"{script.stem}.yaml", script, LLAMA, None, None, **flags)
        alone = load_experiment(tmp_path / f"{script.stem}.yaml")
        assert settings(variant_experiment(study, variant, init_from=None)) == settings(alone), variant
    (tmp_path / "broken.py").write_text("import trl\n")  # no model: the study fails, and leaves nothing behind
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TunelabError, match=r"^--model: .*broken.py names no model"):
        study_from_scripts(tmp_path / "two.yaml", [scripts[0], tmp_path / "broken.py"], None, None, None, **flags)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_init_from_several_scripts_writes_the_study_and_says_what_each_variant_sets(tmp_path: Path) -> None:
    beside_its_data(tmp_path, "train_lora.py")
    shutil.copy(SCRIPTS / "train_partial_ft.py", tmp_path / "train_partial_ft.py")
    args = ["--from-script", "train_lora.py", "--from-script", "train_partial_ft.py", "--model", LLAMA]
    done = run_cli("init", "ladder.yaml", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "wrote ladder.yaml: 2 variants" in out
    assert "partial-ft (train_partial_ft.py): the last 4 blocks, norm, lm_head; sets model.dtype, scope, " in out
    assert "next: tunelab study plan ladder.yaml" in out


def test_a_script_that_goes_on_from_anothers_adapter_is_its_variant_after_it(tmp_path: Path) -> None:
    """train_dpo.py as many are written: it loads the adapter train_lora.py saved and trains it further with DPO.
    Alone, init_from is that folder; in a study of both, the DPO variant is `after` the LoRA one."""
    from tunelab.starter import study_from_scripts
    from tunelab.study import load_study

    beside_its_data(tmp_path, "train_lora.py")
    dpo = tmp_path / "train_dpo.py"
    text = (SCRIPTS / "train_dpo.py").read_text().replace(", peft_config=peft_config", "")
    dpo.write_text(
        text.replace(
            "tokenizer = AutoTokenizer",
            "model = PeftModel.from_pretrained(model, 'outputs/lora-qv', is_trainable=True)\ntokenizer = AutoTokenizer",
        )
    )
    flags = {"scope": None, "method": None, "name": None}
    starter_from_script(tmp_path / "dpo.yaml", dpo, LLAMA, None, None, **flags)
    alone = load_experiment(tmp_path / "dpo.yaml")
    assert (alone.init_from, alone.scope.lora is not None) == ("outputs/lora-qv", True)  # the adapter, trained on
    made = study_from_scripts(tmp_path / "ladder.yaml", [tmp_path / "train_lora.py", dpo], LLAMA, None, None, **flags)
    assert made.variants["dpo"]["after"] == "lora-qv" and "init_from" not in made.variants["dpo"]["set"]
    assert load_study(tmp_path / "ladder.yaml").spec.variants["dpo"].after == "lora-qv"


def test_a_loraplus_optimizer_is_read_as_the_ratio_and_the_learning_rate_it_trains_with(tmp_path: Path) -> None:
    path = beside_its_data(tmp_path, "train_lora.py")
    call = (
        "optimizer = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=1e-4, "
        "loraplus_lr_ratio=16, loraplus_lr_embedding=1e-6)\n"
    )
    path.write_text(path.read_text().replace("trainer = SFTTrainer(", call + "trainer = SFTTrainer(", 1))
    read = read_script(path)
    assert read.settings["scope.lora.loraplus_ratio"] == 16 and read.settings["train.learning_rate"] == 1e-4
    assert read.unread == ["loraplus_lr_embedding=1e-06 (LoRA+'s; no experiment key)"]
