"""`tunelab init --from-script`: the experiment a training script defines, read from its text, never run.

A train_lora.py names its base (`from_pretrained("meta-llama/...")`), its data (`load_dataset("json", data_files=...)`),
its trainer (SFTTrainer, DPOTrainer, ...), where LoRA attaches (`LoraConfig(...)`) or which original weights open
(`requires_grad = True` on `model.model.layers[-4:]`, the norm, lm_head), and its rhythm (`TrainingArguments(...)` or
TRL's `SFTConfig(...)`). Those are read where they are literals, or names bound to literals at the top of the
script; a value computed at run time (`args.lr`) is listed as not read.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import LIBRARY_NAMES, METHOD_SECTIONS, LoraScope, TrainSettings
from tunelab.errors import TunelabError

TRAINERS = {"SFT": "sft", "DPO": "dpo", "KTO": "kto", "ORPO": "orpo", "CPO": "simpo", "Reward": "reward", "": "sft"}
TRAINING_CONFIGS = {"TrainingArguments", *(f"{k}Config" for k in TRAINERS if k)}
FILE_BUILDERS = ("json", "csv", "parquet")  # load_dataset's builders for local files
NOT_SETTINGS = {"task_type", "report_to", "push_to_hub", "hub_model_id", "logging_dir", "run_name"}


@dataclass
class ScriptRead:
    """What a script defines, as experiment keys (dotted) and values; and what it computes, so could not be read."""

    model: str | None = None
    data: str | list[str] | None = None
    eval_data: str | None = None
    method: str | None = None
    scope: str | None = None  # an init --scope: all-linear where a LoraConfig is, partial-last4, full-ft
    settings: dict[str, Any] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)


def read_script(path: Path) -> ScriptRead:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except FileNotFoundError as e:
        raise TunelabError(f"--from-script: '{path}' not found") from e
    except (SyntaxError, UnicodeDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, SyntaxError) else ""
        raise TunelabError(f"--from-script: {path}{where}: not Python this version reads ({e})") from e
    names = _module_literals(tree)
    read = ScriptRead()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        _read_call(call, _called(call), names, read)
    if read.scope is None:
        read.scope = _opened_weights(tree, read)
    if "output.dir" in read.settings:  # output_dir names the run: its last folder is the name, the rest the runs'
        out = Path(str(read.settings.pop("output.dir")))
        read.settings["name"] = out.name
        read.settings["output.dir"] = str(out.parent) if str(out.parent) != "." else "runs"
    return read


def _called(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _module_literals(tree: ast.Module) -> dict[str, Any]:
    """Names the script binds to literals at its top level (MODEL_ID = "...", LR = 2e-4), the last binding kept."""
    names: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = _literal(node.value, names) if node.value is not None else _UNREAD
            for target in targets:
                if isinstance(target, ast.Name) and value is not _UNREAD:
                    names[target.id] = value
    return names


_UNREAD = object()


def _literal(node: ast.expr, names: dict[str, Any]) -> Any:
    """A literal's value, a name bound to one, `list(range(a, b))` (PEFT's layers_to_transform), `torch.bfloat16`,
    or os.path.join of those; else _UNREAD."""
    if isinstance(node, ast.Name):
        return names.get(node.id, _UNREAD)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        return node.attr  # torch.bfloat16 -> "bfloat16"
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e, names) for e in node.elts]
        return _UNREAD if _UNREAD in items else items
    if isinstance(node, ast.Call) and node.args and not node.keywords:
        args = [_literal(a, names) for a in node.args]
        if _UNREAD in args:
            return _UNREAD
        called = _called(node)
        if called == "join" and all(isinstance(a, str) for a in args):
            return str(Path(*args))
        if called in ("list", "tuple") and isinstance(node.args[0], ast.Call) and _called(node.args[0]) == "range":
            return args[0]
        if called == "range" and len(args) <= 2 and all(isinstance(a, int) for a in args):
            start, stop = (0, args[0]) if len(args) == 1 else args
            return list(range(start, stop))
        return _UNREAD
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UNREAD


def _read_call(call: ast.Call, called: str, names: dict[str, Any], read: ScriptRead) -> None:
    if called == "from_pretrained" and re.search(
        r"ForCausalLM|AutoModel\b|ForConditionalGeneration", ast.unparse(call.func)
    ):
        _read_model(call, names, read)
    elif called == "load_dataset":
        _read_data(call, names, read)
    elif called.endswith("Trainer") and called.removesuffix("Trainer") in TRAINERS:
        read.method = read.method or TRAINERS[called.removesuffix("Trainer")]
    elif called == "LoraConfig":
        read.scope = "all-linear"
        _read_settings(call, names, read, "scope.lora", set(LoraScope.model_fields))
        _left_to_defaults(call, called, read)
    elif called in TRAINING_CONFIGS:
        method = TRAINERS.get(called.removesuffix("Config"))
        if method is not None and called != "TrainingArguments":
            read.method = method
        own = set(METHOD_SECTIONS[method].model_fields) if method in METHOD_SECTIONS else set()
        _read_settings(call, names, read, "train", set(TrainSettings.model_fields), method, own)
        _left_to_defaults(call, called, read)


def _left_to_defaults(call: ast.Call, called: str, read: ScriptRead) -> None:
    """What the script left to the library's defaults ran with those: the installed library's, written out."""
    given = {k.arg for k in call.keywords}
    for name, value in _library_defaults(called).items():
        if name not in given:
            read.settings.setdefault(_DEFAULTED[name], value)


# The settings whose library default a script relies on when it leaves them out, and their experiment keys.
_DEFAULTED = (
    {"r": "scope.lora.r", "learning_rate": "train.learning_rate", "seed": "train.seed"}
    | {"max_length": "train.max_length"}
    | {
        name: LIBRARY_NAMES[name].key
        for name in ("lora_alpha", "lora_dropout", "target_modules", "num_train_epochs", "per_device_train_batch_size")
    }
    | {"gradient_accumulation_steps": LIBRARY_NAMES["gradient_accumulation_steps"].key}
)


def _library_defaults(called: str) -> dict[str, Any]:
    """The installed library's defaults of `called`'s settings in _DEFAULTED (PEFT's target_modules default is the
    model's own, q_proj and v_proj on Llama: the qv preset)."""
    import dataclasses

    if called == "LoraConfig":
        from peft import LoraConfig as config
    else:
        import transformers
        import trl

        config = getattr(trl, called, None) or getattr(transformers, called, None)
        if config is None:  # an experimental trainer's config (ORPO, CPO): its defaults are not read
            return {}
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(config)
        if f.name in _DEFAULTED and f.default is not dataclasses.MISSING and f.default is not None
    }
    return defaults | ({"target_modules": "qv"} if called == "LoraConfig" else {})


def _read_model(call: ast.Call, names: dict[str, Any], read: ScriptRead) -> None:
    if call.args and isinstance(model := _literal(call.args[0], names), str):
        read.model = read.model or model
    elif call.args:
        read.unread.append(f"the model ({ast.unparse(call.args[0])})")
    for keyword in call.keywords:
        if keyword.arg in ("torch_dtype", "dtype") and isinstance(dtype := _literal(keyword.value, names), str):
            read.settings["model.dtype"] = dtype


def _read_data(call: ast.Call, names: dict[str, Any], read: ScriptRead) -> None:
    first = _literal(call.args[0], names) if call.args else _UNREAD
    files = next((k.value for k in call.keywords if k.arg == "data_files"), None)
    source = _literal(files, names) if files is not None and first in FILE_BUILDERS else first
    if isinstance(source, dict):  # data_files={"train": ..., "test": ...}
        read.data = source.get("train", read.data)
        read.eval_data = source.get("test", source.get("validation", read.eval_data))
    elif isinstance(source, str | list) and read.data is None:
        read.data = source
    elif source is _UNREAD:
        read.unread.append(f"the data ({ast.unparse(call)})")


def _read_settings(
    call: ast.Call,
    names: dict[str, Any],
    read: ScriptRead,
    section: str,
    fields: set[str],
    method: str | None = None,
    own: set[str] = frozenset(),
) -> None:
    """A config call's keywords as experiment keys: the same name in `section` (or the method's own section), or
    the key LIBRARY_NAMES gives a library's name."""
    for keyword in call.keywords:
        name = keyword.arg
        if name is None or name in NOT_SETTINGS:
            continue
        substitute = None
        if name in own:
            key = f"{method}.{name}"
        elif name in fields:
            key = f"{section}.{name}"
        elif name in LIBRARY_NAMES:
            key, substitute = LIBRARY_NAMES[name].key, LIBRARY_NAMES[name].value
        else:
            continue
        value = _literal(keyword.value, names)
        if value is _UNREAD:
            read.unread.append(f"{name} ({ast.unparse(keyword.value)})")
        elif key == "scope.lora.layers" and isinstance(value, list) and all(isinstance(i, int) for i in value):
            read.settings[key] = _ranges(value)
        elif substitute is None:
            read.settings[key] = value
        elif value is True:  # bf16=True: model.dtype bfloat16
            read.settings[key] = substitute


def _ranges(layers: list[int]) -> list[int | str]:
    """[16, 17, ..., 31] as ["16-31"]: runs of consecutive layers as the experiment file writes them."""
    runs: list[list[int]] = []
    for i in sorted(set(layers)):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [first if first == last else f"{first}-{last}" for first, last in runs]


def _opened_weights(tree: ast.Module, read: ScriptRead) -> str | None:
    """Without a LoraConfig: the original weights a script opens with `requires_grad = True` (or
    `requires_grad_(True)`): the last N blocks of `...layers[-N:]`, the final norm, lm_head."""
    opens = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign | ast.Call)
        and "requires_grad" in ast.unparse(n)
        and "True" in ast.unparse(n.value if isinstance(n, ast.Assign) else n)
    ]
    if not opens:
        return "full-ft" if read.model else None
    text = ast.unparse(tree)
    starts = [
        _literal(n.slice.lower, {})
        for n in ast.walk(tree)
        if isinstance(n, ast.Subscript)
        and isinstance(n.slice, ast.Slice)
        and n.slice.lower is not None
        and "layers" in ast.unparse(n.value)
    ]
    last = [-start for start in starts if isinstance(start, int) and start < 0]
    if not last:
        read.unread.append("which weights open (requires_grad set on weights this reader cannot name)")
        return "full-ft"
    read.settings["scope.partial.last_blocks"] = last[0]
    read.settings["scope.partial.norm"] = ".norm." in text or ".norm " in text or "model.norm" in text
    read.settings["scope.partial.lm_head"] = "lm_head" in text
    return "partial-last4"
