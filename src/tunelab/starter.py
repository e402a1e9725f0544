"""`tunelab init`: a first experiment file for the user's own model and data.

Every setting that shapes the run is written out, each with its description from the schema as a comment, and the
file is checked by the same validation `plan` runs before it is written. The method follows the data (preference
pairs: DPO; thumbs-up/down completions: KTO; anything else: SFT); the rhythm follows what trains.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from tunelab.config import (
    METHOD_SECTIONS,
    DataSettings,
    Experiment,
    LoraScope,
    PartialScope,
    Scope,
    model_class,
    validate,
)
from tunelab.errors import TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tunelab.script import ScriptRead


# What each --scope writes, and says: the four LoRA variants of train_lora.py, train_partial_ft.py's open weights,
# and full fine-tuning.
def _lora(targets: str, layers: str) -> Scope:
    return Scope(lora=LoraScope(r=16, alpha=32, dropout=0.05, targets=targets, layers=layers))


SCOPES: dict[str, tuple[Scope, str]] = {
    "qv": (_lora("qv", "all"), "LoRA r16 on q_proj and v_proj"),
    "qkvo": (_lora("qkvo", "all"), "LoRA r16 on q/k/v/o_proj"),
    "all-linear": (_lora("all-linear", "all"), "LoRA r16 on every linear layer"),
    "last-half": (_lora("all-linear", "last-half"), "LoRA r16 on every linear layer of the last half of the blocks"),
    "partial-last4": (
        Scope(partial=PartialScope(last_blocks=4, norm=True, lm_head=True)),
        "the last 4 blocks, norm and lm_head",
    ),
    "full-ft": (Scope(full=True), "every parameter"),
}
# Peak learning rates by what trains (adapter or original weights) and objective. An adapter starts at zero and
# takes 2e-4 (the schema's default, PEFT's usual LoRA rate); original weights move 40x slower (train_partial_ft.py's
# 5e-6); preference objectives, which push on a model that already answers, a further 40x and 10x slower.
LEARNING_RATES = {
    ("adapter", "sft"): 2e-4,
    ("weights", "sft"): 5e-6,
    ("adapter", "pref"): 5e-6,
    ("weights", "pref"): 5e-7,
}
METHOD_OF_FORMAT = {"preference": "dpo", "unpaired": "kto"}
EVAL_FRACTION = 0.05


@dataclass
class Starter:
    path: Path
    exp: Experiment
    data_format: str
    rows: int
    trains: str  # what the scope opens, in words
    read_from: Path | None = None  # the training script it was read from (--from-script)
    unread: list[str] = field(default_factory=list)  # what that script computes, or sets to what cannot be
    notes: list[str] = field(default_factory=list)  # where the file and that script's run differ, or might
    saves_to: Path | None = None  # the folder that script saves its model in (its output_dir)
    copied: Path | None = None  # the file its GRPO reward functions and tools were copied into


def _comment(description: str | None) -> str:
    first = re.split(r"(?<=\.)\s+(?=[A-Z])", description or "")[0].rstrip(".")
    return f"  # {first}" if first else ""


def _meta_model(model: str) -> PreTrainedModel | None:
    """The model built on the meta device from its config, as plan builds it; None where this machine cannot read
    the config (a hub id without the network): plan says what it finds."""
    from tunelab.config import ModelSettings
    from tunelab.models import load_config, meta_model

    try:
        return meta_model(load_config(ModelSettings(id=model)))
    except TunelabError:
        return None


def _stored_quantization(model: str) -> dict:
    """model.quantization for a local checkpoint stored by bitsandbytes (an unsloth *-bnb-4bit download), which trains
    only as a quantized base; nothing for others (a hub id's config is read by plan)."""
    from tunelab.models import bitsandbytes_stored

    config = Path(model) / "config.json"
    if not config.is_file():
        return {}
    try:
        stored = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError):
        return {}  # plan says what is wrong with it
    packed = bitsandbytes_stored(stored) if isinstance(stored, dict) else None
    return {"quantization": packed.model_dump(exclude={"compute_dtype"})} if packed else {}


def _lines(cls: type[BaseModel], values: dict, indent: int = 0) -> list[str]:
    out = []
    for key, value in values.items():
        field = cls.model_fields[key]
        pad = " " * indent
        section = model_class(field.annotation) if isinstance(value, dict) else None
        if section is not None:
            out.append(f"{pad}{key}:{_comment(field.description)}")
            out += _lines(section, value, indent + 2)
        else:
            scalar = yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()
            out.append(f"{pad}{key}: {scalar}{_comment(field.description)}")
    return out


def _relative(source: str, folder: Path) -> str:
    """Data paths in an experiment file are read relative to the file: a relative path given from here is rewritten
    from the file's folder; absolute paths and hub dataset ids stay as given."""
    if Path(source).is_absolute() or not Path(source).exists():
        return source
    return os.path.relpath(Path(source).resolve(), folder.resolve())


def parse_columns(text: str) -> dict[str, str]:
    """--columns question=prompt,answer=completion: the dataset's fields and the names tunelab reads them by."""
    from typing import get_args

    from tunelab.config import READ_FIELDS

    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise TunelabError(
            f"--columns: '{text}' is not FIELD=NAME pairs; give them comma-separated, e.g. "
            "question=prompt,answer=completion"
        )
    columns = {old.strip(): new.strip() for old, new in pairs}
    names = get_args(READ_FIELDS)
    for new in columns.values():
        if new not in names:
            raise TunelabError(f"--columns: '{new}' is not a field tunelab reads; one of {', '.join(names)}")
    return columns


def _data_section(data: str, eval_data: str | None, split: str | None, folder: Path, subset: str | None) -> dict:
    """Where the rows come from. A folder or hub dataset trains on `split`, else on its training split by name
    (train, or train_sft as UltraChat names it), and without --eval holds out the split that goes with that (test_sft,
    test, validation, ...) where it has one."""
    from tunelab.data import dataset_splits, train_and_held_out

    section: dict = {"train": _relative(data, folder)} | ({"subset": subset} if subset else {})
    splits = dataset_splits(data, subset)
    if splits is None:
        if split is not None or subset is not None:
            flag = "--split" if split is not None else "--subset"
            raise TunelabError(f"{flag}: '{data}' is a file, which has no splits or subsets; leave {flag} out")
        return section | ({"eval": _relative(eval_data, folder)} if eval_data else {"eval_fraction": EVAL_FRACTION})
    if split is not None and split not in splits:
        raise TunelabError(f"--split: '{data}' has no split '{split}'; its splits are {', '.join(splits)}")
    train, held_out = train_and_held_out(splits, split)
    if train is None:
        raise TunelabError(
            f"--data: '{data}' has the splits {', '.join(splits)}, and which to train on is not clear from their "
            "names; give --split NAME"
        )
    section |= {"hub_split": train} if train != "train" else {}
    if eval_data:
        return section | {"eval": _relative(eval_data, folder)}
    if held_out:
        return section | {"eval": section["train"], "eval_split": held_out}
    return section | {"eval_fraction": EVAL_FRACTION}


def as_flags(message: str) -> str:
    """A data error's renaming, said as init's flag: 'data.columns: {query: prompt, response: completion}' becomes
    '--columns query=prompt,response=completion'; 'data.as_chat: true' becomes '--as-chat'."""

    def flag(match: re.Match) -> str:
        pairs = ",".join(pair.replace(": ", "=") for pair in match.group(2).split(", "))
        return f"--columns {pairs}" if match.group(1) == ": " else f"--columns (e.g. {pairs})"

    return re.sub(r"data\.columns(: | \(e\.g\. )\{([^{}]*)\}\)?", flag, message).replace(
        "data.as_chat: true", "--as-chat"
    )


def _with_overrides(values: dict, overrides: dict[str, Any], path: Path) -> tuple[dict, list[str]]:
    """`values` with the overrides set together (settings depend on each other: GRPO's batch and generations, a
    quantization's bits and type), leaving out, one at a time, a setting (or a nested section's settings, as
    model.quantization's) without which the rest validates; and the errors that left each out."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2]) if len(parts) > 2 else key, {})[key] = value
    unread = []
    while True:
        try:
            return _valid(_set(values, {k: v for g in groups.values() for k, v in g.items()}), path), unread
        except TunelabError as e:
            error = str(e).removeprefix(f"{path}: ")
        for group in groups:
            rest = {k: v for g, items in groups.items() if g != group for k, v in items.items()}
            try:
                _valid(_set(values, rest), path)
            except TunelabError:
                continue
            unread.append(error)
            del groups[group]
            break
        else:  # no one setting is to blame: each on its own, as far as it validates
            for settings in groups.values():
                try:
                    values = _valid(_set(values, settings), path)
                except TunelabError as e:
                    unread.append(str(e).removeprefix(f"{path}: "))
            return values, unread


def _valid(values: dict, path: Path) -> dict:
    """`values` where they validate as an experiment file at `path`, else the TunelabError saying why."""
    validate(values, str(path))
    return values


def _set(values: dict, settings: dict[str, Any]) -> dict:
    """A copy of `values` with the dotted keys of `settings` set."""
    out = copy.deepcopy(values)
    for key, value in settings.items():
        node = out
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = value
    return out


def write_starter(
    path: Path,
    model: str,
    data: str,
    eval_data: str | None,
    scope: str,
    method: str | None,
    name: str | None,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    as_chat: bool = False,
    subset: str | None = None,
    overrides: dict[str, Any] | None = None,
    loss_on: dict[str, str] | None = None,
) -> Starter:
    """Write a first experiment file at `path` (never over an existing file) and return what it holds. `overrides`:
    dotted keys set over what init chooses (a training script's, read by tunelab.script); one that does not
    validate is left out and listed in the Starter's `unread`. `loss_on`: data.loss_on by the data's format (what a
    script's trainer trained loss on, which follows the rows' shape)."""
    from tunelab.data import load_file

    if path.exists():
        raise TunelabError(f"{path}: already exists; give another path (tunelab init never replaces a file)")
    if scope not in SCOPES:
        raise TunelabError(f"--scope: '{scope}' is not one of {', '.join(SCOPES)}")
    folder = path.parent
    data_section = _data_section(data, eval_data, split, folder, subset)
    data_section |= ({"columns": columns} if columns else {}) | ({"as_chat": True} if as_chat else {})
    # The rows read as training will read them, checked against the method when one is given.
    settings = DataSettings(**(data_section | {"train": data}))
    try:
        loaded = load_file(data, "--data", settings, method)
        # prompts alone: GRPO's (with a script's rewards), or an answer under a name to rename (SFT's refusal)
        if loaded.format == "prompt" and not (method == "grpo" and "grpo.rewards" in (overrides or {})):
            if method == "grpo":
                raise TunelabError(
                    "--method: grpo learns from reward functions, which init cannot write; start from "
                    "examples/grpo.yaml and examples/rewards.py"
                )
            if method == "distill":
                raise TunelabError(
                    "--method: distill learns from a teacher model, which init does not ask for; start from "
                    "examples/distill.yaml"
                )
            load_file(data, "--data", settings, "sft")
    except TunelabError as e:
        raise TunelabError(as_flags(str(e))) from e
    fmt, rows = loaded.format, loaded.rows
    method = method or METHOD_OF_FORMAT.get(fmt, "sft")
    if loss_on and fmt in loss_on:
        overrides = {"data.loss_on": loss_on[fmt]} | (overrides or {})
    from tunelab.scopes import get_scope

    chosen, words = SCOPES[scope]
    trains = "adapter" if get_scope(chosen.kind).adds_parameters else "weights"
    stored = _stored_quantization(model)
    if stored and trains != "adapter":
        lora = ", ".join(k for k, (v, _) in SCOPES.items() if get_scope(v.kind).adds_parameters)
        raise TunelabError(
            f"--scope: '{model}' is stored quantized by bitsandbytes, whose packed weights take no gradient, so "
            f"{scope} cannot train them; give a LoRA scope ({lora}), or the unquantized checkpoint"
        )
    rate = LEARNING_RATES[(trains, "sft" if method == "sft" else "pref")]
    chosen, change = get_scope(chosen.kind).written_for(chosen, lambda: _meta_model(model))  # what the model needs
    words += f", {change}," if change else ""
    values = {
        "name": name or f"{Path(data).name.split('.')[0]}-{scope}".replace("_", "-"),
        "model": {"id": model, "dtype": "auto"} | stored,
        "data": data_section,
        "method": method,
        "scope": chosen.model_dump(exclude_unset=True, mode="json"),
        "train": {
            "learning_rate": rate,
            "epochs": 2 if scope == "partial-last4" else 1,
            "batch_size": 4,
            "grad_accumulation": 4,
            "max_length": 1024,
            "seed": 42,
        },
        "output": {"dir": "runs"},
    }
    if method == "grpo":  # a script's rewards (a GRPO section needs them before any other key validates)
        values["grpo"] = {"rewards": (overrides or {})["grpo.rewards"]}
    values, unread = _with_overrides(values, overrides or {}, path)
    text = (
        f"# Written by tunelab init. Check it with: tunelab plan {path.name} (every key: tunelab schema)\n"
        + "\n".join(_lines(Experiment, values))
        + "\n"
    )
    exp = validate(yaml.safe_load(text), str(path))
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
    return Starter(path, exp, fmt, len(rows), words, unread=unread)


def starter_from_script(
    path: Path, script: Path, model: str | None, data: str | None, eval_data: str | None, **flags: Any
) -> Starter:
    """The experiment a training script defines (tunelab.script reads it, never runs it), written as init writes
    one; --model, --data, --eval and the other flags given override what the script names."""
    from tunelab.recipe import read_command
    from tunelab.script import read_script

    python = script.suffix in (".py", ".ipynb")
    read = read_script(script) if python else read_command(script)  # else a .yaml recipe, a .sh
    data_given = data
    settings = dict(read.settings)
    model = model or read.model
    files = [_beside(script, f) for f in read.data] if data is None and isinstance(read.data, list) else []
    if len(files) > 1:  # data_files=[...]: the list, as there
        settings["data.train"] = [_relative(f, path.parent) for f in files]
    if data is None and (data := _beside(script, read.data)) is not None:  # the script's data, split and subset
        if Path(data).is_file() and (read.split or read.subset):
            named = " and ".join(
                f"{kind} '{value}'" for kind, value in (("split", read.split), ("subset", read.subset)) if value
            )
            read.unread.append(f"the {named} of {data} (a file, which has neither)")
        else:
            flags["split"] = flags.get("split") or read.split
            flags["subset"] = flags.get("subset") or read.subset
    if (model is None or data is None) and read.trl_parser:
        raise TunelabError(
            f"--from-script: {script.name} takes its settings from TRL's command line (TrlParser); give the recipe "
            "it ran with (--from-script recipe.yaml) or the shell script that runs it (--from-script train.sh)"
        )
    if model is None or data is None:
        missing = "--model" if model is None else "--data"
        raise TunelabError(
            f"{missing}: {script} names no {missing[2:]} this reader can take as written; give {missing}"
        )
    if read.scope is None and read.opens_by and not flags.get("scope"):
        raise TunelabError(
            f"--scope: {script.name} opens weights by a rule this reader does not follow ({read.opens_by}); give "
            f"--scope ({', '.join(SCOPES)}), then set scope.partial in the file to what it opens"
        )
    named = settings.pop("name", None)  # output_dir's last folder
    flags["name"] = flags.get("name") or named or script.stem.replace("_", "-")
    flags["method"] = flags.get("method") or read.method
    if flags.get("scope"):  # --scope replaces what the script trains
        settings = {key: value for key, value in settings.items() if not key.startswith("scope.")}
    flags["scope"] = flags.get("scope") or read.scope or "all-linear"
    given_eval = eval_data
    eval_data = eval_data or _beside(script, read.eval_data)
    for flag, source, given in (("--data", data, data_given), ("--eval", eval_data, given_eval)):
        if source is not None and given is None and _missing_file(source):  # a Colab path, another machine's
            raise TunelabError(
                f"{flag}: {script.name} reads '{source}', which is not here; give {flag} with where that data is here"
            )
    if read.loss is not None:
        settings["data.loss_on"] = read.loss
    moved = None
    if model != read.model and read.model is not None and "scope.lora.layers" in settings:
        settings["scope.lora.layers"], moved = _layers_on(settings["scope.lora.layers"], read.model, model, script)
    if "init_from" in settings and not Path(settings["init_from"]).is_absolute():  # the script's folder's, as data
        settings["init_from"] = os.path.relpath(script.parent / settings["init_from"], path.parent)
    trl_sft = read.trainer == "SFTTrainer" and read.loss is None and flags["method"] in (None, "sft")
    loss_on = dict.fromkeys(WHOLE_SEQUENCE_FORMATS, "all") if trl_sft else None
    functions = _write_functions(path, read)
    try:
        starter = write_starter(path, model, data, eval_data, overrides=settings, loss_on=loss_on, **flags)
    except BaseException:
        if functions is not None:
            functions.unlink()
        raise
    starter.read_from, starter.unread = script, read.unread + starter.unread
    starter.notes = _differences(starter.exp, read, trl_sft) + ([moved] if moved else [])
    starter.saves_to = (script.parent / read.output_dir).resolve() if read.output_dir else None
    starter.copied = functions
    if len(files) > 1:  # init read the first file's rows; the run reads them all
        from tunelab.data import load_file

        exp = starter.exp
        starter.rows = sum(len(load_file(f, "--data", exp.data, exp.method).rows) for f in files)
    starter.trains = _scope_words(starter.exp.scope)
    return starter


def _layers_on(layers: list, scripts_model: str, model: str, script: Path) -> tuple[Any, str | None]:
    """A script's LoRA layers (PEFT's layers_to_transform, indices) where --model replaces its model: the same part of
    the new model (the last half of Llama-3.1-8B's 32 layers, 16-31, is layers 8-15 of a 16-layer model), as the
    layer words (last-half, {last: N}, ...) that select them on the script's model; and a note of it. Indices that
    are no such part, or of a model whose config cannot be read here, stay as they are where the new model has them.
    Raises TunelabError where it has not."""
    import sys

    from tunelab.config import ModelSettings
    from tunelab.models import load_config
    from tunelab.scope import layer_ranges, select_layers

    def depth(model_id: str) -> int | None:
        return getattr(load_config(ModelSettings(id=model_id)).get_text_config(), "num_hidden_layers", None)

    chosen = select_layers(layers, sys.maxsize, "scope.lora.layers")
    try:
        before = depth(scripts_model)
    except TunelabError:
        before = None  # a hub id this machine cannot reach, a gated one
    now = depth(model)
    intent = _layer_words(chosen, before) if before else None
    if intent is not None and now is not None:
        words = intent if isinstance(intent, str) else f"{{{next(iter(intent))}: {next(iter(intent.values()))}}}"
        return intent, (
            f"scope.lora.layers: {words}, the part of {scripts_model}'s {before} layers the script trains "
            f"({', '.join(map(str, layers))}); on {model}'s {now} layers that is "
            f"{layer_ranges(select_layers(intent, now, 'scope.lora.layers'))}"
        )
    if now is not None and max(chosen) >= now:
        known = f"{before} layers" if before else "whose config this machine cannot read"
        raise TunelabError(
            f"--model: {script.name} trains LoRA on layers {', '.join(map(str, layers))} of {scripts_model} ({known}), "
            f"and {model} has {now} (0-{now - 1}); give --scope with the part of this model to train (e.g. last-half)"
        )
    return layers, None


def _layer_words(chosen: list[int], count: int) -> str | dict | None:
    """The layer words that select exactly `chosen` of a `count`-layer model; None where none does."""
    from tunelab.scope import select_layers

    for words in ("all", "last-half", "first-half"):
        if select_layers(words, count, "") == chosen:
            return words
    n = len(chosen)
    if chosen == list(range(count - n, count)):
        return {"last": n}
    if chosen == list(range(n)):
        return {"first": n}
    return None


def _write_functions(path: Path, read: ScriptRead) -> Path | None:
    """The reward functions and tools a GRPO script defines, copied into a file beside the experiment (never over
    an existing one), which grpo.rewards and grpo.tools name; None where the script defines none."""
    if read.functions_source is None or read.functions_file is None:  # nothing to copy, or a recipe
        return None
    target = path.parent / read.functions_file
    if target.exists():
        raise TunelabError(
            f"{target}: already exists, and init copies the script's reward functions there; move it, or write the "
            "experiment into another folder (tunelab init never replaces a file)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "x", encoding="utf-8") as f:
        f.write(read.functions_source)
    return target


# The data formats TRL's SFTTrainer trains on every token of, prompts included, unless assistant_only_loss is on: its
# conversational and language-modeling rows (a prompt-completion row trains on the completion).
WHOLE_SEQUENCE_FORMATS = ("messages", "conversations")


def _differences(exp: Experiment, read: ScriptRead, trl_sft: bool) -> list[str]:
    """Where the written experiment's run and the script's differ, or where the script's habit is not tunelab's."""
    notes = []
    if read.argument_defaults:
        given = ", ".join(f"{dest}={value}" for dest, value in read.argument_defaults.items())
        notes.append(
            f"read as the defaults of the script's command line (a run with no flags): {given}; a run given other "
            "flags trained with those: set them here too"
        )
    if exp.data.loss_on == "all" and trl_sft:
        notes.append(
            "data.loss_on: all, as TRL's SFTTrainer trained the script's chats: every token, prompts and system "
            "text included (its assistant_only_loss was off); replies trains on the answers only"
        )
    if read.functions:
        notes.append(
            f"{', '.join(read.functions)} copied from the script into {read.functions_file} (beside this file), with "
            "the imports and names they use, for grpo.rewards, grpo.tools and grpo.environment to name: the script "
            "itself trains when it is imported"
        )
    script_held_out = read.eval_data is not None or "data.eval_fraction" in read.settings
    if not script_held_out and exp.data.eval_fraction is not None:
        notes.append(
            f"data.eval_fraction: {exp.data.eval_fraction:g} is init's: the script evaluated on no held-out rows, and "
            f"{exp.data.eval_fraction:.0%} of them no longer train; remove it to train on them all"
        )
    elif not script_held_out and exp.data.eval is not None:
        notes.append(
            f"data.eval is init's ({exp.data.eval}, split {exp.data.eval_split}): the script evaluated on no "
            "held-out rows; remove it (and data.eval_split) to do the same"
        )
    return notes


def _scope_words(scope: Scope) -> str:
    """What a scope opens, in words, as a script's settings made it."""
    if scope.lora is not None:
        lora = scope.lora
        targets = ", ".join(lora.targets) if isinstance(lora.targets, list) else lora.targets
        chosen = ", ".join(map(str, lora.layers)) if isinstance(lora.layers, list) else lora.layers
        layers = "" if lora.layers == "all" else f", layers {chosen}"
        return f"LoRA r{lora.r} on {targets}{layers}"
    if scope.partial is not None:
        p = scope.partial
        parts = [f"the last {p.last_blocks} blocks" if p.last_blocks else "", "norm" * p.norm, "lm_head" * p.lm_head]
        return ", ".join(part for part in parts if part)
    return "every parameter"


def _missing_file(source: str) -> bool:
    """A data path a script names that is not on this machine (a hub dataset id is not a path)."""
    from tunelab.data import written_as_path

    return not Path(source).expanduser().exists() and written_as_path(source)


def _beside(script: Path, data: str | list[str] | None) -> str | None:
    """A data path as the script names it: read from the script's folder where it is there (the script ran from
    there), else as it is (a hub id); of a list of files, the first (whose rows init reads)."""
    if isinstance(data, list):
        data = data[0] if data else None
    if data is None or Path(data).is_absolute():
        return data
    return str(script.parent / data) if (script.parent / data).exists() else data


@dataclass
class StudyStarter:
    path: Path
    variants: dict[str, dict[str, Any]]  # each script's variant: the base's overrides (set), the run it goes on from
    starters: list[Starter]  # each script's experiment, with what it did not carry over


def study_from_scripts(
    path: Path, scripts: list[Path], model: str | None, data: str | None, eval_data: str | None, **flags: Any
) -> StudyStarter:
    """The ladder a set of training scripts runs (train_lora.py in its variants, train_partial_ft.py, train_dpo.py),
    as one study file: the first script's experiment is the base, every script a variant setting what its own
    experiment changes from it. Each is read as `init --from-script` reads one; the study is checked as `study plan`
    checks it before it is written."""
    if path.exists():
        raise TunelabError(f"{path}: already exists; give another path (tunelab init never replaces a file)")
    starters: list[Starter] = []
    try:
        return _study_from_scripts(path, scripts, model, data, eval_data, starters, **flags)
    except BaseException:  # a failing script leaves no file behind: nor the reward functions copied before it
        for starter in starters:
            if starter.copied is not None:
                starter.copied.unlink(missing_ok=True)
        raise


def _study_from_scripts(
    path: Path,
    scripts: list[Path],
    model: str | None,
    data: str | None,
    eval_data: str | None,
    starters: list[Starter],
    **flags: Any,
) -> StudyStarter:
    from tunelab.study import load_study

    raws = []
    for i, script in enumerate(scripts):  # beside the study, so data paths are written relative to its folder
        scratch = path.parent / f".{path.stem}-{i}-{script.stem}.yaml"
        try:
            starters.append(starter_from_script(scratch, script, model, data, eval_data, **flags))
            raws.append(yaml.safe_load(scratch.read_text(encoding="utf-8")))
        finally:
            scratch.unlink(missing_ok=True)
    base = {k: v for k, v in raws[0].items() if k not in ("output", "init_from")}  # the study places each run
    base_settings = {k: v for k, v in base.items() if k != "name"}
    base_values = starters[0].exp.model_dump(mode="json")
    variants: dict[str, dict[str, Any]] = {}
    for raw, starter in zip(raws, starters, strict=True):
        name = raw["name"] if raw["name"] not in variants else f"{raw['name']}-{len(variants) + 1}"
        settings = {k: v for k, v in raw.items() if k not in ("name", "output")}
        variants[name] = {"set": _overrides(base_settings, base_values, settings, starter.exp.model_dump(mode="json"))}
    _after(variants, starters, path.parent)
    text = (
        f"# Written by tunelab init from {', '.join(s.name for s in scripts)}: the first script's experiment is the "
        "base,\n# each script a variant with what its experiment changes. Check it with: "
        f"tunelab study plan {path.name}\n"
        + yaml.safe_dump({"name": path.stem, "base": base, "variants": variants}, sort_keys=False, width=120)
    )  # fmt: skip
    scratch = path.parent / f".{path.name}.partial"
    scratch.write_text(text, encoding="utf-8")
    try:
        load_study(scratch)  # every variant resolves, as study plan resolves it
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    finally:
        scratch.unlink(missing_ok=True)
    return StudyStarter(path, variants, starters)


def _after(variants: dict[str, dict[str, Any]], starters: list[Starter], folder: Path) -> None:
    """A script that goes on from the adapter another script saves (train_dpo.py's PeftModel.from_pretrained of
    train_lora.py's output_dir) is a variant `after` that one: the study starts it from that variant's run."""
    saved = {s.saves_to: name for name, s in zip(variants, starters, strict=True) if s.saves_to is not None}
    for (name, variant), starter in zip(variants.items(), starters, strict=True):
        start = variant["set"].pop("init_from", None) or starter.exp.init_from
        if start is None:
            continue
        variant["set"].pop("init_from", None)
        before = saved.get((folder / start).resolve())
        if before is not None and before != name:
            variant["after"] = before
        else:
            starter.unread.append(
                f"init_from {start} (a variant of a study starts from another variant's run only, by `after`: "
                "give the script that saves it too)"
            )


# Sections whose keys are alternatives (a scope is LoRA, partial or full; eval data or an eval fraction): a variant
# that holds another of them sets the section whole, since setting its keys would keep the base's rival.
RIVALS = {"scope": tuple(Scope.model_fields), "data": ("eval", "eval_fraction")}


def _overrides(base: dict, base_values: dict, variant: dict, values: dict, prefix: str = "") -> dict[str, Any]:
    """The dotted keys that make the base's experiment into the variant's: each setting either file writes whose
    value differs between them (`base`/`variant`: as written, `base_values`/`values`: as validated, defaults
    filled), a section of rivals set whole where the variant holds another rival."""
    out: dict[str, Any] = {}
    for key in [*base, *(k for k in variant if k not in base)]:
        dotted = f"{prefix}{key}"
        written = variant.get(key)
        if key in METHOD_SECTIONS and not prefix and written is None:
            continue  # another method's section gives way by itself in a variant
        was = base.get(key)
        if any((r in (was or {})) != (r in (written or {})) for r in RIVALS.get(dotted, ())):
            out[dotted] = written
        elif isinstance(values.get(key), dict) and isinstance(was or written, dict):
            out |= _overrides(was or {}, base_values.get(key) or {}, written or {}, values[key], f"{dotted}.")
        elif base_values.get(key) != values.get(key):
            out[dotted] = written if written is not None else values.get(key)
    return out
