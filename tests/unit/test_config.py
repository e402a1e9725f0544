import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, EXAMPLES, write_experiment
from tunelab.config import LIBRARY_NAMES, Experiment, LastN, json_schema, load_experiment, model_class
from tunelab.errors import TunelabError

BASE = f"""\
name: t
model:
  id: builtin:tiny-chat
data:
  train: {DATA}/sft_train.jsonl
"""


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = write_experiment(tmp_path, text)
    with pytest.raises(TunelabError) as e:
        load_experiment(path, overrides)
    return str(e.value)


EXPERIMENTS = [p for p in sorted(EXAMPLES.glob("*.yaml")) if "variants" not in yaml.safe_load(p.read_text())]
STUDIES = [p for p in sorted(EXAMPLES.glob("*.yaml")) if p not in EXPERIMENTS]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_every_study_example_loads(study: Path) -> None:
    from tunelab.study import load_study

    assert load_study(study).order


@pytest.mark.parametrize("example", EXPERIMENTS, ids=lambda p: p.name)
def test_every_example_validates(example: Path) -> None:
    exp = load_experiment(example)
    assert exp.name == yaml.safe_load(example.read_text())["name"]
    for f in exp.data.train_files:
        assert Path(f).is_file(), f


def test_issue_example_reads_as_written(tmp_path: Path) -> None:
    text = f"""\
name: qkvo-last-half
model:
  id: meta-llama/Llama-3.1-8B-Instruct
  dtype: auto
data:
  train: {DATA}/sft_train.jsonl
  eval: {DATA}/sft_eval.jsonl
method: sft
scope:
  lora:
    r: 16
    alpha: 32
    dropout: 0.05
    targets: qkvo
    layers: last-half
train:
  learning_rate: 2.0e-4
  epochs: 2
  batch_size: 4
  grad_accumulation: 4
  max_length: 1024
  seed: 42
output:
  dir: runs
"""
    exp = load_experiment(write_experiment(tmp_path, text))
    assert exp.scope.kind == "lora" and exp.scope.lora.targets == "qkvo" and exp.scope.lora.layers == "last-half"
    assert exp.train.grad_accumulation == 4 and exp.train.learning_rate == 2e-4
    assert exp.model.trust_remote_code is False


def test_unknown_key_names_line_and_suggestion(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "train:\n  learnin_rate: 0.1\n")
    assert msg == f"{tmp_path}/exp.yaml:7: unknown key 'train.learnin_rate'; did you mean 'learning_rate'?"


def test_a_training_scripts_own_names_are_answered_with_the_key_they_are_here(tmp_path: Path) -> None:
    """A LoraConfig and TrainingArguments carried over from train_lora.py as they were written."""
    text = BASE + "scope:\n  lora:\n    r: 16\n    layers_to_transform: [28, 29, 30, 31]\n"
    assert error_of(tmp_path, text) == (
        f"{tmp_path}/exp.yaml:9: unknown key 'scope.lora.layers_to_transform' (PEFT's LoraConfig name); in an "
        "experiment file it is scope.lora.layers"
    )
    assert error_of(tmp_path, BASE + "train:\n  bf16: true\n").endswith(
        ":7: unknown key 'train.bf16' (Transformers' TrainingArguments name); in an experiment file it is "
        "model.dtype: bfloat16"
    )
    assert error_of(tmp_path, BASE, ["train.per_device_train_batch_size=4"]) == (
        "--set train.per_device_train_batch_size: unknown key 'per_device_train_batch_size' (Transformers' "
        "TrainingArguments name); in an experiment file it is train.batch_size (times train.grad_accumulation a "
        "step, as there)"
    )


@pytest.mark.parametrize("name", sorted(LIBRARY_NAMES))
def test_each_library_name_points_at_a_key_of_the_experiment_file(name: str) -> None:
    """The key named exists (a renamed key would leave the table pointing nowhere), and the library's name is not
    itself a key there."""
    target = LIBRARY_NAMES[name].key.split(".")
    cls = Experiment
    for part in target[:-1]:
        cls = model_class(cls.model_fields[part].annotation)
    assert target[-1] in cls.model_fields and name not in cls.model_fields


def test_the_libraries_still_call_their_settings_so() -> None:
    """Each name said to be a current library's is a field of that library's config as installed."""
    import dataclasses
    import inspect

    import torch
    from peft import LoraConfig
    from peft.optimizers import create_loraplus_optimizer
    from transformers import TrainingArguments
    from trl import GRPOConfig, ModelConfig, SFTConfig

    fields = {
        "PEFT's LoraConfig": {f.name for f in dataclasses.fields(LoraConfig)},
        "Transformers' TrainingArguments": {f.name for f in dataclasses.fields(TrainingArguments)},
        "TRL's ModelConfig": {f.name for f in dataclasses.fields(ModelConfig)},
        "TRL's GRPOConfig": {f.name for f in dataclasses.fields(GRPOConfig)},
        "TRL's SFTConfig": {f.name for f in dataclasses.fields(SFTConfig)},
        "PyTorch's optimizers'": set(inspect.signature(torch.optim.AdamW).parameters),
        "PEFT's create_loraplus_optimizer": set(inspect.signature(create_loraplus_optimizer).parameters),
    }
    current = {name: n.whose for name, n in LIBRARY_NAMES.items() if not re.search(r" \d|0\.x", n.whose)}
    assert len(current) >= 20
    assert [name for name, whose in current.items() if name not in fields[whose]] == []


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "scpoe: full\n")
    assert msg.endswith(":6: unknown key 'scpoe'; did you mean 'scope'?")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("train:\n  learning_rate: fast\n", "exp.yaml:7: train.learning_rate: Input should be a valid number"),
        ("train:\n  batch_size: 0\n", "exp.yaml:7: train.batch_size: Input should be greater than 0"),
        ("scope:\n  lora:\n    dropout: 1.5\n", "exp.yaml:8: scope.lora.dropout: Input should be less than 1"),
        ("scope:\n  lora:\n    layers: middle\n", "exp.yaml:8: scope.lora.layers: 'middle' is not a layer selection"),
        ("scope:\n  lora:\n    layers: [1, '7-x']\n", "scope.lora.layers: layer item '7-x' is neither an index"),
        ("scope:\n  lora: {}\n  full: true\n", "choose exactly one of lora, partial or full"),
        ("scope:\n  partial: {}\n", "partial opens nothing"),
        ("dpo:\n  beta: 0.1\n", "a dpo section is set but method is sft"),
        (
            "method: ppo\n",
            "method: 'ppo' is not a choice; input should be 'sft', 'dpo', 'kto', 'orpo', 'simpo', 'grpo', 'distill' or 'reward'",
        ),
        (
            "train:\n  batch_size: 8\n  micro_batch_size: 3\n",
            "train.micro_batch_size: 3 does not divide train.batch_size=8; use a divisor",
        ),
        (
            "method: dpo\ntrain:\n  padding_free: on\n",
            "train.padding_free: TRL's DPO trainer has no padding-free batches",
        ),
        ("method: dpo\ntrain:\n  micro_batch_size: 2\n", "train.micro_batch_size: splitting batches applies to SFT"),
        (
            "train:\n  keep: best\n",
            "train.keep: best: compares evaluations, and there is no eval data; set data.eval (a file), "
            "data.eval_fraction (e.g. 0.05) or data.eval_split",
        ),
        ("train:\n  early_stop: 3\n", "train.early_stop: compares evaluations, and there is no eval data"),
        (
            "  eval_fraction: 0.1\ntrain:\n  keep: best\n  eval_steps: 4\n  save_steps: 6\n",
            "train.keep: best keeps the checkpoint of the best evaluation, so checkpoints must fall on evaluations: "
            "make train.save_steps (6) a multiple of train.eval_steps (4)",
        ),
    ],
)
def test_bad_values(tmp_path: Path, extra: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + extra)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            f"name: t\nmodel: 3\ndata: {DATA}/sft_train.jsonl\n",
            "exp.yaml:2: model: expected a mapping of its settings (id, revision, dtype, device, attn_implementation, "
            "trust_remote_code, quantization), or its id alone",
        ),
        (BASE + "tokenizer: 5\n", "exp.yaml:6: tokenizer: expected a mapping of its settings (id, chat_template, "),
    ],
)
def test_a_section_given_as_a_plain_value_lists_its_keys(tmp_path: Path, text: str, said: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path}/{said}") and "instance of" not in error
    assert error.endswith("or its id alone") == ("model: 3" in text)  # tokenizer has no short form


def test_missing_required_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: t\nmodel:\n  id: builtin:tiny-chat\n")
    assert msg == f"{tmp_path}/exp.yaml:1: missing required key 'data'"


def test_missing_experiment_file(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="nope.yaml: file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: t\nmodel: id: x\n")
    assert msg == f"{tmp_path}/exp.yaml:2: not valid YAML (mapping values are not allowed here)"


def test_overrides_are_typed_by_schema(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, BASE)
    exp = load_experiment(path, ["train.learning_rate=5e-6", "train.epochs=2", "scope.lora.layers={last: 4}"])
    assert exp.train.learning_rate == 5e-6 and isinstance(exp.train.learning_rate, float)
    assert exp.train.epochs == 2.0
    assert exp.scope.lora.layers == LastN(last=4)


def test_an_override_of_a_data_sources_setting_keeps_its_path(tmp_path: Path) -> None:
    """--set data.train.rows=100 (or a study variant's) on a file given as a plain path samples that file."""
    path = write_experiment(tmp_path, BASE)
    plain = load_experiment(path)
    exp = load_experiment(path, ["data.train.rows=100"])
    assert (exp.data.train.path, exp.data.train.rows) == (plain.data.train, 100)
    assert exp.config_hash() != plain.config_hash()


def test_a_model_and_data_given_as_one_value_are_their_id_and_training_data(tmp_path: Path) -> None:
    """`model: org/name` and `data: train.jsonl` (or a list of sources), as one writes them first; --set and study
    variants reach their keys as they reach the long form's."""
    long = load_experiment(write_experiment(tmp_path, BASE))
    short = write_experiment(tmp_path, f"name: t\nmodel: builtin:tiny-chat\ndata: {DATA}/sft_train.jsonl\n", "s.yaml")
    assert load_experiment(short) == long
    listed = write_experiment(
        tmp_path, f"name: t\nmodel: builtin:tiny-chat\ndata: [{DATA}/sft_train.jsonl]\n", "l.yaml"
    )
    assert load_experiment(listed).data.train == [long.data.train]
    exp = load_experiment(short, ["model.dtype=float32", f"data.eval={DATA}/sft_eval.jsonl", "data.train.rows=10"])
    assert (exp.model.id, exp.model.dtype) == ("builtin:tiny-chat", "float32")
    assert (exp.data.train.path, exp.data.train.rows, exp.data.eval) == (long.data.train, 10, f"{DATA}/sft_eval.jsonl")
    assert load_experiment(write_experiment(tmp_path, BASE, "b.yaml"), ["model=builtin:tiny-chat"]) == long


def test_override_switches_to_full(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, BASE), ["scope=full"])
    assert exp.scope.kind == "full"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.learnin_rate=1", "--set train.learnin_rate: unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
        ("train.learning_rate", "--set train.learning_rate: expected KEY=VALUE"),
        ("train.learning_rate.x=1", "--set train.learning_rate.x: 'train.learning_rate' has no sub-keys"),
        ("train.learning_rate=-1", "train.learning_rate: Input should be greater than 0"),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE, [override])


def test_yaml_booleans_for_on_off(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, BASE + "train:\n  gradient_checkpointing: off\n"))
    assert exp.train.gradient_checkpointing == "off"


def test_relative_paths_resolve_against_the_experiment_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "x"}\n')
    exp = load_experiment(
        write_experiment(tmp_path, "name: t\nmodel: {id: builtin:tiny-chat}\ndata: {train: d/a.jsonl}\n")
    )
    assert exp.data.train == str(tmp_path / "d" / "a.jsonl")
    assert exp.output.dir == "runs"


def test_every_field_is_documented() -> None:
    schema = json_schema()

    def walk(props: dict, where: str) -> None:
        for name, prop in props.items():
            assert prop.get("description"), f"{where}.{name} has no description"

    walk(schema["properties"], "experiment")
    for name, sub in schema["$defs"].items():
        walk(sub.get("properties", {}), name)
    assert schema["additionalProperties"] is False


def test_the_schema_editors_read_accepts_every_example_and_the_short_forms() -> None:
    import jsonschema

    schema = json_schema()
    for example in EXPERIMENTS:
        jsonschema.validate(yaml.safe_load(example.read_text()), schema)
    for short in ("model: org/name\ndata: d.jsonl\nscope: full", "model: org/name\ndata: [a.jsonl, {path: b.jsonl}]"):
        jsonschema.validate(yaml.safe_load(f"name: t\n{short}\n"), schema)
    for wrong in ("model: 3\ndata: d.jsonl", "model: org/name\ndata: d.jsonl\nscope: everything"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(f"name: t\n{wrong}\n"), schema)


def test_a_chat_template_written_in_the_experiment_is_the_template(tmp_path: Path) -> None:
    """Jinja text in tokenizer.chat_template (a YAML block, as a model card prints a template) is the template itself,
    not a file name: one longer than a file name may be was refused as 'File name too long', without the key."""
    from transformers import AutoTokenizer

    from tunelab.builtin import materialise
    from tunelab.templates import resolve_template

    template = (
        "{# " + "a comment longer than any file name " * 10 + "#}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    exp = load_experiment(write_experiment(tmp_path, BASE + f"tokenizer:\n  chat_template: |\n    {template}\n"))
    assert exp.tokenizer.chat_template == template + "\n"
    assert resolve_template(exp.tokenizer.chat_template, AutoTokenizer.from_pretrained(materialise("tiny-chat"))) == (
        template + "\n"
    )


def test_config_hash_is_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_experiment(write_experiment(tmp_path, BASE))
    b = load_experiment(write_experiment(tmp_path, BASE))
    c = load_experiment(write_experiment(tmp_path, BASE), ["train.seed=1"])
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert isinstance(Experiment.model_validate(a.model_dump()), Experiment)


def test_every_method_in_the_schema_has_its_code_and_section() -> None:
    from typing import get_args

    from tunelab.config import METHOD_SECTIONS, METHODS
    from tunelab.methods import REGISTRY

    assert set(get_args(METHODS)) == set(REGISTRY)
    assert set(METHOD_SECTIONS) == set(REGISTRY) - {"sft"}


@pytest.mark.parametrize("method", ["kto", "orpo", "simpo"])
def test_a_method_section_belongs_to_its_method(tmp_path: Path, method: str) -> None:
    assert f"a {method} section is set but method is sft" in error_of(tmp_path, BASE + f"{method}:\n  beta: 0.2\n")
    exp = load_experiment(write_experiment(tmp_path, BASE + f"method: {method}\n"))
    assert getattr(exp, method) is not None  # defaults filled in


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "grpo: method grpo learns from reward functions, and none is named"),
        ("grpo: {rewards: []}\n", "grpo.rewards: List should have at least 1 item"),
        ("grpo: {rewards: [r.py:f], reward_weights: [1, 2]}\n", "grpo.reward_weights: 2 weights for 1 rewards"),
        ("grpo: {rewards: [r.py:f], generations: 3}\n", "8 is not a multiple of 3: set train.batch_size: 6"),
        ("grpo: {rewards: [r.py:f], generations: 1}\n", "grpo.generations: Input should be greater than or equal to 2"),
        ("grpo: {rewards: [r.py:f], max_completion_length: 1024}\n", "leaves no room for the prompt"),
        (
            "grpo: {rewards: [r.py:f], beta: 0.04}\ninit_from: runs/x\nscope: {partial: {last_blocks: 2}}\n",
            "TRL reloads from the base model, not from init_from's run, for a partial scope",
        ),
    ],
)
def test_grpo_settings_that_cannot_work_are_refused(tmp_path: Path, extra: str, expected: str) -> None:
    batch = "train:\n  batch_size: 8\n  max_length: 1024\n"
    assert expected in error_of(tmp_path, BASE + "method: grpo\n" + batch + extra)


def test_grpo_reward_files_resolve_against_the_experiment_file(tmp_path: Path) -> None:
    text = BASE + "method: grpo\ngrpo: {rewards: [r.py:f, trl:think_format_reward]}\ntrain: {batch_size: 8}\n"
    exp = load_experiment(write_experiment(tmp_path, text))
    assert exp.grpo.rewards == ["r.py:f", "trl:think_format_reward"]  # no such file: kept as written, plan says so
    (tmp_path / "r.py").write_text("def f(completions, **kw):\n    return [0.0] * len(completions)\n")
    exp = load_experiment(tmp_path / "exp.yaml")
    assert exp.grpo.rewards == [f"{tmp_path / 'r.py'}:f", "trl:think_format_reward"]
    assert exp.grpo.generations == 8 and exp.grpo.beta == 0.0 and exp.grpo.loss_type == "dapo"


@pytest.mark.parametrize("key", ["packing", "group_by_length"])
def test_batch_settings_other_trainers_ignore_are_refused(tmp_path: Path, key: str) -> None:
    """Before, packing and group_by_length were passed to SFT alone and silently ignored for the other methods."""
    msg = error_of(tmp_path, BASE + f"method: dpo\ntrain:\n  {key}: true\n")
    assert f"train.{key}: applies to SFT; TRL's DPO trainer draws its batches itself" in msg


def test_kto_needs_batches_to_estimate_its_kl_term(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "method: kto\ntrain:\n  batch_size: 1\n")
    assert "KTO estimates its KL term from other examples of a batch" in msg


def test_command_line_words_stay_words(tmp_path: Path) -> None:
    path = write_experiment(tmp_path, BASE)
    exp = load_experiment(path, ["output.name=on", "train.packing=yes", "train.gradient_checkpointing=off"])
    assert exp.output.name == "on" and exp.train.packing is True and exp.train.gradient_checkpointing == "off"


@pytest.mark.parametrize(("layers", "written"), [("[]", "[]"), ("{last: 2, first: 1}", "{'last': 2, 'first': 1}")])
def test_a_layer_selection_that_is_none_of_the_forms_gets_the_whole_list_of_forms(
    tmp_path: Path, layers: str, written: str
) -> None:
    msg = error_of(tmp_path, BASE + f"scope:\n  lora:\n    layers: {layers}\n")
    assert msg == (
        f"{tmp_path}/exp.yaml:8: scope.lora.layers: {written} is not a layer selection; use all | last-half | "
        "first-half | {last: N} | {first: N} | a list of indices and ranges like [0, 1, '5-7']"
    )


def test_a_missing_nested_key_is_reported_at_its_section(tmp_path: Path) -> None:
    msg = error_of(tmp_path, f"name: t\ndata:\n  train: {DATA}/sft_train.jsonl\nmodel:\n  dtype: auto\n")
    assert msg == f"{tmp_path}/exp.yaml:4: missing required key 'model.id'"


def test_local_inputs_are_found_beside_the_experiment_file_wherever_it_runs(tmp_path: Path, monkeypatch) -> None:
    here = tmp_path / "exp"
    (here / "model").mkdir(parents=True)
    (here / "sft-run").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (here / name).write_text("")
    text = "name: t\nmodel: {id: model}\ndata: {train: [a.jsonl, b.jsonl]}\nmethod: dpo\ninit_from: sft-run\n"
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(write_experiment(here, text))
    assert exp.model.id == str(here / "model")
    assert exp.data.train == [str(here / "a.jsonl"), str(here / "b.jsonl")]
    assert exp.init_from == str(here / "sft-run")


@pytest.mark.parametrize(("layers", "n"), [("{first: 0}", "0"), ("{last: x}", "'x'"), ("{last: true}", "True")])
def test_a_layer_count_below_one_says_so(tmp_path: Path, layers: str, n: str) -> None:
    msg = error_of(tmp_path, BASE + f"scope:\n  lora:\n    layers: {layers}\n")
    word = layers[1:].split(":")[0]
    assert (
        msg
        == f"{tmp_path}/exp.yaml:8: scope.lora.layers: {{{word}: N}} takes a number of layers N of at least 1, not {n}"
    )


def test_a_bad_list_item_is_reported_at_its_own_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "train:\n  report_to:\n    - tensorboard\n    - wandbb\n")
    assert msg.startswith(f"{tmp_path}/exp.yaml:9: train.report_to.1: 'wandbb' is not a choice; input should be ")


def test_one_layer_index_is_a_list_of_one(tmp_path: Path) -> None:
    exp = load_experiment(write_experiment(tmp_path, BASE + "scope:\n  lora:\n    layers: 3\n"))
    assert exp.scope.lora.layers == [3]


HASHED_BEFORE = {  # tunelab at fb6cc8e, before template_vars and LoRA's dora, rslora, open and tokens existed
    "name: qkvo-last-half\nmodel: {id: meta-llama/Llama-3.1-8B-Instruct}\n"
    "data: {train: /data/train.jsonl, eval: /data/eval.jsonl}\nscope: {lora: {targets: qkvo, layers: last-half}}\n"
    "train: {learning_rate: 2.0e-4, epochs: 2, batch_size: 4, grad_accumulation: 4, max_length: 1024}\n"
    "output: {dir: /runs}\n": "3fd8103b9e2ab786",
    "name: partial\nmodel: {id: meta-llama/Llama-3.1-8B-Instruct}\ndata: {train: /data/train.jsonl}\n"
    "scope: {partial: {last_blocks: 4, norm: true, lm_head: true}}\ntrain: {learning_rate: 5.0e-6, epochs: 2}\n"
    "output: {dir: /runs}\n": "a3ad862afdd1beec",
}


@pytest.mark.parametrize("text", list(HASHED_BEFORE), ids=["lora", "partial"])
def test_settings_added_later_keep_older_runs_hash(tmp_path: Path, text: str) -> None:
    """A run made before a setting existed keeps its config hash while the setting is at its default, so resume and
    studies still recognise it; setting it changes the hash."""
    exp = write_experiment(tmp_path, text)
    assert load_experiment(exp).config_hash() == HASHED_BEFORE[text]
    for change in (
        "tokenizer.template_vars={enable_thinking: false}",
        "scope.lora.dora=true",
        "scope.lora.open=[norm]",
        "train.neftune=5",
        "train.save_minutes=null",
    ):
        if "lora" in change and "partial" in text:
            continue
        assert load_experiment(exp, [change]).config_hash() != HASHED_BEFORE[text], change


@pytest.mark.parametrize(
    ("grpo", "steps"),
    [
        ("{rewards: [r.py:f], generations: 4}", 48 * 4 // 8 * 2),
        ("{rewards: [r.py:f], generations: 4, iterations: 2}", 48 * 4 * 2 // 8 * 2),
        ("{rewards: [r.py:f], generations: 8}", 48 * 8 // 8 * 2),
    ],
)
def test_grpo_steps_count_every_sampled_reply(tmp_path: Path, grpo: str, steps: int) -> None:
    """TRL repeats each prompt `generations` times (and each batch of replies `iterations` times), and batch_size
    counts replies: 48 prompts, batch 8, 2 epochs."""
    from tunelab.plan import optimizer_steps

    text = BASE + f"method: grpo\ngrpo: {grpo}\ntrain: {{batch_size: 8, epochs: 2}}\n"
    assert optimizer_steps(load_experiment(write_experiment(tmp_path, text)), 48) == steps
