"""`tunelab init --from-script` on TRL's command line: a recipe (`trl sft --config recipe.yaml`, the
alignment-handbook's recipes/<model>/sft/config_qlora.yaml) or a shell script that runs `trl sft ...` or
`accelerate launch sft.py ...`.

Their settings are read as TRL's TrlParser reads them, by the names of its dataclasses: ScriptArguments (dataset_name,
dataset_config, the train and test splits), a dataset mixture (`datasets:`), ModelConfig (model_name_or_path, dtype,
use_peft and lora_*, load_in_4bit) and the method's config (SFTConfig, DPOConfig: the names a script's config call
takes). Flags override the recipe, as TrlParser has them. A setting left out is the installed TRL's default, which the
command ran with: ModelConfig's dtype float32, lora_r 16 and lora_alpha 32; SFTConfig's learning rate and batch size.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.script import (
    TRAINERS,
    Computed,
    ScriptRead,
    config_defaults,
    defaults_left_out,
    loss_from,
    named_by_output,
    quantization_from,
    settings_from,
)

METHODS = {method: key for key, method in TRAINERS.items() if key}  # sft: SFT (SFTConfig, SFTTrainer)
# ModelConfig's LoRA names and LoraConfig's, which TRL's get_peft_config passes them as.
LORA = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"} | {
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}


def read_command(path: Path) -> ScriptRead:
    """A TRL recipe (.yaml) or a shell script's TRL command line, as the experiment it runs."""
    if path.suffix in (".yaml", ".yml"):
        read = _read_settings(_recipe(path, "--from-script"), _method_in(path.parts))
    else:
        read = _read_command_line(path)
    named_by_output(read)
    return read


def _read_command_line(path: Path) -> ScriptRead:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise TunelabError(f"--from-script: '{path}' not found") from e
    except UnicodeDecodeError as e:
        raise TunelabError(f"--from-script: {path}: not a text file ({e})") from e
    command = _command(text)
    if command is None:
        raise TunelabError(
            f"--from-script: {path} runs no `trl sft|dpo|kto|reward` and no Python script this reader sees; give the "
            "training script (.py), a TRL recipe (.yaml) or a shell script that runs one"
        )
    method, args = command
    flags, positional = _flags(args)
    config = flags.pop("config", next((a for a in positional if a.endswith((".yaml", ".yml"))), None))
    settings: dict[str, Any] = {}
    unread = []
    if isinstance(config, str):  # --config recipe.yaml, or the recipe as the script's argument (alignment-handbook)
        found = next((p for p in (path.parent / config, Path(config)) if p.is_file()), None)
        if found is None:
            unread.append(f"the recipe {config} (not found beside {path.name} or here)")
        else:
            settings = _recipe(found, f"--from-script: {path.name}'s --config")
            method = method or _method_in(found.parts)
    read = _read_settings(settings | flags, method)
    read.unread[:0] = unread
    return read


def _recipe(path: Path, where: str) -> dict[str, Any]:
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TunelabError(f"{where}: '{path}' not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TunelabError(f"{where}: {path}: not YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(recipe, dict):
        raise TunelabError(f"{where}: {path}: a TRL recipe is a mapping of settings (model_name_or_path: ...)")
    return recipe


def _method_in(parts: tuple[str, ...] | list[str]) -> str | None:
    """The method a path names in its file name or folder: recipes/zephyr/dpo/config.yaml, run_sft.py."""
    for word in reversed([w for part in parts[-2:] for w in re.split(r"[^a-z]+", Path(part).stem.lower())]):
        if word in METHODS:
            return word
    return None


def _command(text: str) -> tuple[str | None, list[str]] | None:
    """The first command line that runs `trl <method>` or a Python script: the method, and the arguments after it."""
    for line in re.sub(r"\\\n", " ", text).splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unclosed quote: not a command this reader takes
            continue
        for i, token in enumerate(tokens):
            if Path(token).name == "trl" and i + 1 < len(tokens) and tokens[i + 1] in METHODS:
                return tokens[i + 1], tokens[i + 2 :]
            if token.endswith(".py"):
                return _method_in([token]), tokens[i + 1 :]
    return None


def _flags(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`--name value`, `--name=value`, `--flag` (true) and `--names a b` (a list), as HfArgumentParser reads them;
    and the arguments that are no flag's."""
    flags: dict[str, Any] = {}
    positional = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            flags[name] = _typed(value)
            continue
        values = []
        while i < len(args) and not args[i].startswith("--"):
            values.append(_typed(args[i]))
            i += 1
        flags[name] = True if not values else values[0] if len(values) == 1 else values
    return flags, positional


def _typed(text: str) -> Any:
    """A command-line value as HfArgumentParser types it; a shell variable's is computed."""
    if "$" in text or "`" in text:
        return Computed(text)
    if text in ("true", "True", "false", "False"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _defaults(name: str) -> dict[str, Any]:
    import trl

    return config_defaults(getattr(trl, name))


def _read_settings(settings: dict[str, Any], method: str | None) -> ScriptRead:
    """TrlParser's settings (ScriptArguments, ModelConfig, the method's config) as what the experiment sets."""
    model_defaults = _defaults("ModelConfig")
    data_names = set(_defaults("ScriptArguments")) | {"datasets", "streaming", "test_split_size"}
    read = ScriptRead(method=method, trainer=f"{METHODS[method]}Trainer" if method else None)
    model = dict(model_defaults) | {k: v for k, v in settings.items() if k in model_defaults}
    _read_model(model, settings, read)
    _read_data(settings, read)
    if model["use_peft"] is True:
        read.scope = "all-linear"
        lora = {peft: model[trl] for trl, peft in LORA.items() if model[trl] is not None}
        if lora.get("target_modules") in (["all-linear"], ("all-linear",)):
            lora["target_modules"] = "all-linear"
        settings_from(lora, read, section="scope.lora")
        defaults_left_out(set(lora), "LoraConfig", read)  # target_modules None: PEFT's, the model's own
    elif isinstance(model["use_peft"], Computed):
        read.unread.append(f"use_peft ({model['use_peft'].text})")
    else:
        read.scope = "full-ft"
    dtype = model["dtype"]
    quantization_from(
        {"load_in_4bit": model["load_in_4bit"], "load_in_8bit": model["load_in_8bit"]}
        | {
            "bnb_4bit_quant_type": model["bnb_4bit_quant_type"],
            "bnb_4bit_use_double_quant": model["use_bnb_nested_quant"],
        }
        | {"bnb_4bit_compute_dtype": dtype},  # TRL computes 4-bit layers in the model's dtype
        read,
    )
    training = {k: v for k, v in settings.items() if k not in model_defaults and k not in data_names}
    training.pop("torch_dtype", None)  # read as the model's dtype
    settings_from(training, read, method)
    defaults_left_out(set(training), f"{METHODS[method or 'sft']}Config", read)
    loss_from(training, read)
    template = settings.get("chat_template_path", settings.get("chat_template"))
    if isinstance(template, str):
        read.settings["tokenizer.chat_template"] = template
    return read


def _read_model(model: dict[str, Any], settings: dict[str, Any], read: ScriptRead) -> None:
    if isinstance(model["model_name_or_path"], str):
        read.model = model["model_name_or_path"]
    dtype = settings.get("torch_dtype", model["dtype"])  # ModelConfig's torch_dtype before TRL 0.22
    model["dtype"] = dtype
    values = {"model.dtype": dtype, "model.attn_implementation": model["attn_implementation"]}
    values |= {"model.revision": model["model_revision"] if model["model_revision"] != "main" else None}
    values |= {"model.trust_remote_code": settings.get("trust_remote_code")}
    for key, value in values.items():
        if isinstance(value, Computed):
            read.unread.append(f"{key.split('.')[1]} ({value.text})")
        elif value is not None:
            read.settings[key] = value


def _read_data(settings: dict[str, Any], read: ScriptRead) -> None:
    """dataset_name with its config and splits, or a mixture (`datasets:` of {path, name, split}); the test split
    is the eval data where the run evaluates (eval_strategy other than "no"), as TRL's scripts pass it."""
    defaults = _defaults("ScriptArguments")
    mixture = settings.get("datasets")
    evaluates = settings.get("eval_strategy", "no") not in ("no", False)
    if isinstance(mixture, list) and mixture and all(isinstance(d, dict) and "path" in d for d in mixture):
        sources = [
            {"path": d["path"], "split": d.get("split", "train")} | ({"subset": d["name"]} if d.get("name") else {})
            for d in mixture
        ]
        read.data = str(mixture[0]["path"])
        read.settings["data.train"] = sources if len(sources) > 1 else str(mixture[0]["path"])
        if len(sources) == 1:
            split = sources[0]["split"]
            read.split, read.subset = split if split != "train" else None, sources[0].get("subset")
        read.unread += [
            f"fraction {d['fraction']} of {d['path']} (TRL's share of the mixture, its first rows; tunelab's "
            "{path, fraction} is a seeded random part of that dataset)"
            for d in mixture
            if d.get("fraction") is not None
        ]
        if isinstance(settings.get("test_split_size"), float):
            read.settings["data.eval_fraction"] = settings["test_split_size"]
        return
    name = settings.get("dataset_name")
    if isinstance(name, Computed):
        read.unread.append(f"dataset_name ({name.text})")
    elif isinstance(name, str):
        read.data = name
        split = str(settings.get("dataset_train_split", defaults["dataset_train_split"]))
        read.split = split if split != "train" else None  # train: the split init reads unless told
        read.subset = settings.get("dataset_config")
        if evaluates:
            read.eval_data = name
            read.settings["data.eval_split"] = str(settings.get("dataset_test_split", defaults["dataset_test_split"]))
