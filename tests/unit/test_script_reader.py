"""`tunelab init --from-script`: the mission's training scripts (tests/fixtures/scripts/, written as their user wrote
them) read into experiment files, never run; what they leave out is what the installed libraries default to."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, run_cli
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan
from tunelab.starter import starter_from_script

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
    assert "never run; not read: learning_rate (float(sys.argv[1]))" in out


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
