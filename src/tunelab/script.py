"""`tunelab init --from-script`: the experiment a training script (or a notebook's code cells) defines, read from its
text, never run.

A train_lora.py names its base (`from_pretrained("meta-llama/...")`), its data (`load_dataset("json", data_files=...)`),
its trainer (SFTTrainer, DPOTrainer, ...), where LoRA attaches (`LoraConfig(...)`) or which original weights open
(`requires_grad = True` on `model.model.layers[-4:]`, the norm, lm_head), and its rhythm (`TrainingArguments(...)` or
TRL's `SFTConfig(...)`). The patterns published scripts share read too: a `BitsAndBytesConfig(...)` is
model.quantization, a second `load_dataset` the trainer takes as `eval_dataset` (or `train_test_split(test_size=...)`)
the eval data, what TRL's SFTTrainer trains loss on (every token of a chat row unless `assistant_only_loss=True`)
data.loss_on, and Unsloth's FastLanguageModel its model, 4-bit base and LoRA. Values are read where they are literals,
names bound to literals at the top of the script, or the defaults of its command-line arguments (`args.lr`: argparse's
or a dataclass HfArgumentParser reads), which also decide its `if`s; a value computed at run time
(`float(sys.argv[1])`) is listed as not read. What a script leaves out is the installed library's default.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import LIBRARY_NAMES, METHOD_SECTIONS, LoraScope, TrainSettings, known_lora_init
from tunelab.errors import TunelabError

TRAINERS = {
    "SFT": "sft", "DPO": "dpo", "KTO": "kto", "ORPO": "orpo", "CPO": "simpo", "Reward": "reward", "GRPO": "grpo",
    "": "sft",
}  # fmt: skip
TRL_CONFIGS = {f"{k}Config" for k in TRAINERS if k}  # SFTConfig, DPOConfig, ...: the method they configure
FILE_BUILDERS = ("json", "csv", "parquet")  # load_dataset's builders for local files
GENERIC_OUTPUTS = ("output", "outputs", "out", "results", "checkpoints")  # an output_dir that names no experiment
HELD_OUT_KEYS = ("test", "validation", "eval", "valid", "dev")  # data_files={"train": ..., "eval": ...}
NOT_SETTINGS = {"task_type", "report_to", "push_to_hub", "hub_model_id", "logging_dir", "run_name"}
# Settings that change what a run learns and that no experiment key carries: named where a script sets them
# otherwise than the library's default, since the experiment written trains without them.
NOT_CARRIED = {"label_smoothing_factor", "adam_beta1", "adam_beta2", "adam_epsilon"} | {
    "lr_scheduler_kwargs", "optim_args", "rank_pattern", "alpha_pattern", "lora_bias",
    "label_smoothing", "rpo_alpha", "max_prompt_length", "truncation_mode", "loss_weights", "use_weighting",
    # GRPOConfig's sampling and objective settings that GRPOSettings does not carry
    "top_k", "min_p", "repetition_penalty", "delta", "steps_per_generation", "generation_batch_size", "entropy_coef",
    "top_entropy_quantile", "sync_ref_model", "multi_objective_aggregation", "off_policy_mask_threshold",
    "use_adaptive_entropy", "num_generations_eval",
}  # fmt: skip
# from_pretrained's keywords that are model settings (torch_dtype and dtype are read as model.dtype).
MODEL_KEYWORDS = ("attn_implementation", "revision", "trust_remote_code")
# Unsloth's defaults, which a notebook that calls FastLanguageModel ran with where it leaves a setting out: its
# from_pretrained (unsloth/models/loader.py) and get_peft_model (unsloth/models/llama.py) at unslothai/unsloth
# 015bdef0d9, and the 4-bit config its loader builds (nf4, double quantization, computing in the model's dtype).
UNSLOTH_LOADS = {"max_seq_length": 2048, "dtype": None, "load_in_4bit": True, "load_in_8bit": False}
UNSLOTH_LOADS |= {"full_finetuning": False, "use_gradient_checkpointing": "unsloth"}
UNSLOTH_LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "random_state": 3407}
UNSLOTH_LORA |= {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
UNSLOTH_LORA |= {"use_gradient_checkpointing": "unsloth"}
UNSLOTH = re.compile(r"\bFast(Language|Vision)?Model\b")
# BitsAndBytesConfig's 4-bit names and model.quantization's.
QUANTIZATION = {"bnb_4bit_quant_type": "type", "bnb_4bit_use_double_quant": "double_quant"} | {
    "bnb_4bit_compute_dtype": "compute_dtype"
}


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
    split: str | None = None  # load_dataset's split of a hub dataset or folder (init's --split)
    subset: str | None = None  # and its config (init's --subset)
    trainer: str | None = None  # the trainer class the script calls
    # What carries the loss, where the script says: "replies" (assistant_only_loss=True, completion_only_loss=True,
    # a completion-only collator) or "all" (completion_only_loss=False); None leaves it to the trainer's defaults.
    loss: str | None = None
    opens_by: str | None = None  # the rule a script opens weights by, where this reader cannot follow it
    trl_parser: bool = False  # it takes its settings from TRL's command line and recipes (TrlParser)
    output_dir: str | None = None  # where it saves its model, as it names the folder
    # The command-line arguments whose defaults settings took (argparse, a dataclass HfArgumentParser reads), by dest.
    argument_defaults: dict[str, Any] = field(default_factory=dict)
    configured: bool = False  # it calls a config of its trainer (TrainingArguments, SFTConfig, ...)
    # GRPO's reward functions and tools the script defines itself, copied (with what they use) into `functions_file`,
    # a file beside the experiment (named after the script) that grpo.rewards and grpo.tools name.
    functions: list[str] = field(default_factory=list)
    functions_file: str | None = None
    functions_source: str | None = None  # that file's text, where the script defines any


@dataclass
class Names:
    """What the script's names stand for: names bound to literals at its top level, and its command-line
    arguments' defaults by dest (`args.lr` is add_argument("--lr", default=2e-4)'s), with those a setting took."""

    literals: dict[str, Any] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)
    defined: set[str] = field(default_factory=set)  # the functions the script defines at its top level
    classes: set[str] = field(default_factory=set)  # and its classes
    imported: dict[str, str] = field(default_factory=dict)  # names its imports bind: `module.name` by name


def read_script(path: Path) -> ScriptRead:
    """A training script (.py), or a notebook's code cells (.ipynb), read."""
    try:
        tree = _parsed(_python_text(path), path)
    except FileNotFoundError as e:
        raise TunelabError(f"--from-script: '{path}' not found") from e
    except (SyntaxError, UnicodeDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, SyntaxError) else ""
        raise TunelabError(f"--from-script: {path}{where}: not Python this version reads ({e})") from e
    names = _module_literals(tree)
    names.arguments = _argument_defaults(tree, names)
    names.defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    names.classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    names.imported = {
        (a.asname or a.name): f"{n.module}.{a.name}"
        for n in tree.body
        if isinstance(n, ast.ImportFrom)
        for a in n.names
    }
    tree = _TakenBranches(names).visit(tree)  # `if args.use_peft:` opens the branch a run with its defaults takes
    names.literals |= _module_literals(tree).literals
    read = ScriptRead(functions_file=f"{path.stem}_rewards.py")
    held_out = _eval_dataset_calls(tree)
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if _called(call) == "load_dataset":
            _read_data(call, names, read, held_out=call in held_out)
        else:
            _read_call(call, _called(call), names, read)
    if read.scope is None:
        read.scope = _opened_weights(tree, read)
    _read_chat_template(tree, names, read)
    if read.trainer and not read.configured and read.trainer.removesuffix("Trainer") in TRAINERS:
        # a TRL trainer given no config ran with its config's defaults (SFTTrainer: SFTConfig's learning rate 2e-5)
        defaults_left_out(set(), read.trainer.replace("Trainer", "Config"), read)
    if read.method == "grpo":
        _functions_copied(tree, _python_text(path), path.name, names, read)
    named_by_output(read)
    read.argument_defaults = names.used
    return read


def _python_text(path: Path) -> str:
    """The script's text; a notebook's code cells one after another, its shell and magic lines (`!pip install
    ...`, `%env`) `pass` at their place."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        import json

        try:
            cells = json.loads(text)["cells"]
            sources = [
                "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                for c in cells
                if c.get("cell_type") == "code"
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise TunelabError(f"--from-script: {path}: not a Jupyter notebook this reader takes ({e})") from e
        return _without_magics("\n".join(sources))
    return text


def _without_magics(text: str) -> str:
    return "\n".join(re.sub(r"^(\s*)[!%].*", r"\1pass", line) for line in text.splitlines())


def _parsed(text: str, path: Path) -> ast.Module:
    """The script parsed; one a notebook exported with its `!pip install` lines is parsed without them."""
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as e:
        try:
            return ast.parse(_without_magics(text), filename=str(path))
        except SyntaxError:
            raise e from None


def named_by_output(read: ScriptRead) -> None:
    """output_dir names the run: its last folder is the name, the folders above it the runs' folder."""
    if "output.dir" in read.settings:
        out = Path(str(read.settings.pop("output.dir")))
        read.output_dir = str(out)
        if str(out.parent) == "." and out.name in GENERIC_OUTPUTS:  # output_dir="outputs": the runs' folder
            read.settings["output.dir"] = out.name
            return
        read.settings["name"] = out.name
        read.settings["output.dir"] = str(out.parent) if str(out.parent) != "." else "runs"


def _called(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _eval_dataset_calls(tree: ast.Module) -> set[ast.Call]:
    """The load_dataset calls whose rows the trainer evaluates on: bound to the name it takes as eval_dataset
    (`eval_ds = load_dataset(...)` ... `SFTTrainer(..., eval_dataset=eval_ds)`)."""
    eval_names = {
        k.value.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _called(n).endswith("Trainer")
        for k in n.keywords
        if k.arg == "eval_dataset" and isinstance(k.value, ast.Name)
    }
    return {
        call
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in eval_names for t in n.targets)
        for call in ast.walk(n.value)
        if isinstance(call, ast.Call) and _called(call) == "load_dataset"
    }


def _module_literals(tree: ast.Module) -> Names:
    """Names the script binds to literals at its top level (MODEL_ID = "...", LR = 2e-4), the last binding kept."""
    names = Names()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = _literal(node.value, names) if node.value is not None else _UNREAD
            for target in targets:
                if isinstance(target, ast.Name) and value is not _UNREAD:
                    names.literals[target.id] = value
                elif (
                    isinstance(target, ast.Tuple) and isinstance(value, list | tuple) and len(value) == len(target.elts)
                ):
                    for element, item in zip(target.elts, value, strict=True):  # TRAIN, EVAL = "a.jsonl", "b.jsonl"
                        if isinstance(element, ast.Name):
                            names.literals[element.id] = item
    return names


class _TakenBranches(ast.NodeTransformer):
    """The script as a run with its literals and command-line defaults executes it: an `if` whose condition they
    decide (`if script_args.use_peft:`, default False) is the branch it takes; any other `if` keeps both."""

    def __init__(self, names: Names) -> None:
        self.names = names

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt]:
        self.generic_visit(node)
        taken = _literal(node.test, self.names)
        if taken is _UNREAD:
            return node
        return (node.body if taken else node.orelse) or ast.Pass()


def _argument_defaults(tree: ast.Module, names: Names) -> dict[str, Any]:
    """The defaults of the script's command-line arguments, by the attribute the script reads them as: argparse's
    `add_argument("--learning_rate", type=float, default=2e-4)` and the fields of a dataclass HfArgumentParser reads
    (`model_name: str = field(default="...")`). A name two arguments share, with two defaults, is neither's."""
    found: dict[str, list[Any]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node) == "add_argument":
            dest, default = _added_argument(node, names)
            if dest is not None and default is not _UNREAD:
                found.setdefault(dest, []).append(default)
        elif isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    value = item.value
                    if (
                        isinstance(value, ast.Call) and _called(value) == "field"
                    ):  # field(default_factory=lambda: [...])
                        said = {k.arg: k.value for k in value.keywords}
                        factory = said.get("default_factory")
                        value = factory.body if isinstance(factory, ast.Lambda) else said.get("default")
                    default = _literal(value, names) if value is not None else _UNREAD
                    if default is not _UNREAD:
                        found.setdefault(item.target.id, []).append(default)
    return {dest: values[0] for dest, values in found.items() if all(v == values[0] for v in values)}


def _added_argument(call: ast.Call, names: Names) -> tuple[str | None, Any]:
    """add_argument's dest and default, with argparse's own: a string default typed by `type`, store_true's False."""
    said = {k.arg: k.value for k in call.keywords if k.arg}
    flags = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    long = next((f for f in flags if f.startswith("--")), flags[0] if flags else None)
    dest = _literal(said["dest"], names) if "dest" in said else long.lstrip("-").replace("-", "_") if long else None
    action = _literal(said["action"], names) if "action" in said else None
    if "default" in said:
        default = _literal(said["default"], names)
    else:
        default = {"store_true": False, "store_false": True}.get(action, _UNREAD)
    kind = ast.unparse(said["type"]) if "type" in said else None
    if isinstance(default, str) and kind in ("int", "float"):
        try:
            default = int(default) if kind == "int" else float(default)
        except ValueError:
            default = _UNREAD
    return (dest if isinstance(dest, str) else None), default


_UNREAD = object()


@dataclass(frozen=True)
class Computed:
    """A setting's value the script computes (`float(sys.argv[1])`), as its text."""

    text: str


def _said(call: ast.Call, names: Names) -> dict[str, Any]:
    """A call's keywords: each literal's value, else what computes it (Computed)."""
    said = {}
    for keyword in call.keywords:
        if keyword.arg is not None:
            value = _literal(keyword.value, names)
            said[keyword.arg] = Computed(ast.unparse(keyword.value)) if value is _UNREAD else value
    return said


def _literal(node: ast.expr, names: Names) -> Any:
    """A literal's value, a name bound to one, `list(range(a, b))` (PEFT's layers_to_transform), `torch.bfloat16`,
    or os.path.join of those; else _UNREAD."""
    if isinstance(node, ast.Name):
        return names.literals.get(node.id, _UNREAD)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
        return node.attr  # torch.bfloat16 -> "bfloat16"
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in names.arguments:
        names.used[node.attr] = names.arguments[node.attr]  # args.lr: its default, as a run without flags has it
        return names.arguments[node.attr]
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(e, names) for e in node.elts]
        return _UNREAD if _UNREAD in items else items
    if isinstance(node, ast.Dict) and None not in node.keys:  # {"train": TRAIN_FILE, ...}
        pairs = [(_literal(k, names), _literal(v, names)) for k, v in zip(node.keys, node.values, strict=True)]
        return _UNREAD if any(_UNREAD in pair for pair in pairs) else dict(pairs)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = _literal(node.operand, names)
        return _UNREAD if value is _UNREAD else not value
    if isinstance(node, ast.BoolOp):  # a and b, a or b: Python's, where every operand is known
        values = [_literal(v, names) for v in node.values]
        if _UNREAD in values:
            return _UNREAD
        result = values[0]
        for value in values[1:]:
            result = (result and value) if isinstance(node.op, ast.And) else (result or value)
        return result
    if isinstance(node, ast.Call) and _called(node) == "dict" and not node.args:  # dict(dtype="bfloat16")
        items = {k.arg: _literal(k.value, names) for k in node.keywords}
        return _UNREAD if None in items or _UNREAD in items.values() else items
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


def _read_call(call: ast.Call, called: str, names: Names, read: ScriptRead) -> None:
    """One call of the script, read by the idioms of the library it belongs to."""
    func = ast.unparse(call.func)
    for reader in (_read_unsloth, _read_transformers, _read_peft, _read_trl, _read_datasets):
        if reader(call, called, func, names, read):
            return


def _read_transformers(call: ast.Call, called: str, func: str, names: Names, read: ScriptRead) -> bool:
    """The base model (from_pretrained), its 4-bit config, TrainingArguments, the collator labelling every token."""
    if called == "from_pretrained" and re.search(r"ForCausalLM|AutoModel\b|ForConditionalGeneration", func):
        _read_model(call, names, read)
        quantization_from(_said(call, names), read)  # from_pretrained(load_in_4bit=True), as transformers 4 took it
    elif called == "BitsAndBytesConfig":
        quantization_from(_said(call, names), read)
    elif called == "TrainingArguments":
        said = _said(call, names)
        settings_from(said, read)
        defaults_left_out(set(said), called, read)
        read.configured = True
    elif called == "DataCollatorForLanguageModeling" and any(k.arg == "mlm" for k in call.keywords):
        read.loss = read.loss or "all"  # transformers' collator (mlm=False): labels are every token but padding
    else:
        return False
    return True


def _read_peft(call: ast.Call, called: str, func: str, names: Names, read: ScriptRead) -> bool:
    """Where LoRA attaches (LoraConfig), and an adapter the script trains further or merges."""
    if called == "LoraConfig":
        read.scope = "all-linear"
        said = _said(call, names)
        settings_from(said, read, section="scope.lora")
        defaults_left_out(set(said), called, read)
        if said.get("init_lora_weights") == "eva":
            given = said.get("eva_config")
            shown = given.text if isinstance(given, Computed) else "PEFT's default EvaConfig(), rho 2"
            read.unread.append(
                f"eva_config ({shown}): tunelab's EVA keeps rank r in every layer (rho 1), where a rho above 1 moves "
                "rank to the layers whose inputs vary most"
            )
    elif (called == "from_pretrained" and re.search(r"\bPeftModel\b", func)) or called == "load_adapter":
        _read_adapter(call, called, names, read)  # PeftModel.from_pretrained(model, "outputs/sft")
    elif called == "create_loraplus_optimizer":  # LoRA+: its lr is the run's (A's), B's is that times the ratio
        said = _said(call, names)
        settings_from({k: v for k, v in said.items() if k in ("lr", "loraplus_lr_ratio")}, read, section="scope.lora")
        read.unread += [f"{k}={v!r} (LoRA+'s; no experiment key)" for k, v in said.items() if k.startswith("loraplus_")
                        and k != "loraplus_lr_ratio"]  # fmt: skip
    elif called == "merge_and_unload":
        read.unread.append(
            "merge_and_unload (the script merges an adapter into the base before it trains; tunelab's init_from "
            "trains that adapter further)"
        )
    else:
        return False
    return True


def _read_adapter(call: ast.Call, called: str, names: Names, read: ScriptRead) -> None:
    """The adapter a script loads to train further (a DPO script going on from its SFT adapter): init_from."""
    position = (
        1 if called == "from_pretrained" else 0
    )  # PeftModel.from_pretrained(model, path); model.load_adapter(path)
    given = call.args[position] if len(call.args) > position else None
    given = given or next((k.value for k in call.keywords if k.arg in ("model_id", "peft_model_id")), None)
    read.scope = read.scope or "all-linear"  # it trains that adapter: a LoRA scope, the adapter's settings
    adapter = _literal(given, names) if given is not None else _UNREAD
    if isinstance(adapter, str):
        read.settings["init_from"] = adapter
    elif given is not None:
        read.unread.append(f"the adapter it starts from ({ast.unparse(given)})")


def _read_trl(call: ast.Call, called: str, func: str, names: Names, read: ScriptRead) -> bool:
    """The trainer (the method), its config, TRL's own chat-template and loss helpers, and its command-line parser."""
    if called.endswith("Trainer") and called.removesuffix("Trainer") in TRAINERS:
        _read_trainer(call, called, names, read)
    elif called in TRL_CONFIGS:
        method = TRAINERS[called.removesuffix("Config")]
        read.method, read.configured = method, True
        said = _said(call, names)
        settings_from(said, read, method)
        defaults_left_out(set(said), called, read)
        loss_from(said, read)
    elif called in ("clone_chat_template", "setup_chat_format"):  # another model's template, or ChatML
        read.unread.append(
            f"the chat template {called} gives ({ast.unparse(call)}); give tokenizer.chat_template (a .jinja file, "
            "or trl:<name>)"
        )
    elif called == "DataCollatorForCompletionOnlyLM":  # TRL < 0.20's loss on the replies only
        read.loss = "replies"
    elif called == "TrlParser":
        read.trl_parser = True
    else:
        return False
    return True


def _read_trainer(call: ast.Call, called: str, names: Names, read: ScriptRead) -> None:
    method = TRAINERS[called.removesuffix("Trainer")]
    read.method, read.trainer = read.method or method, read.trainer or called
    model = next((k.value for k in call.keywords if k.arg == "model"), call.args[0] if call.args else None)
    if model is not None and isinstance(model_id := _literal(model, names), str):  # SFTTrainer(model="org/name")
        read.model = read.model or model_id
    if any(k.arg == "formatting_func" for k in call.keywords):
        read.unread.append(
            "formatting_func (the script writes each row as text its own way; tunelab renders rows with the "
            "chat template: compare plan's rendered example with the script's)"
        )
    # Settings given to the trainer itself, as TRL took them before its configs (max_seq_length, packing, beta); a
    # GRPO trainer's tools are functions, read below.
    settings_from({k: v for k, v in _said(call, names).items() if k != "tools"}, read, method)
    if method == "grpo":
        given = dict(enumerate(call.args)) | {k.arg: k.value for k in call.keywords if k.arg}
        for key, arg in (("grpo.rewards", given.get("reward_funcs", given.get(1))), ("grpo.tools", given.get("tools"))):
            if arg is not None:
                _read_functions(arg, key, names, read)
        if (environment := given.get("environment_factory")) is not None:
            _read_environment(environment, names, read)


def _read_environment(arg: ast.expr, names: Names, read: ScriptRead) -> None:
    """GRPOTrainer's environment_factory: a class the script defines, which init copies beside the experiment as it
    copies the script's tools (grpo.environment names it)."""
    if isinstance(arg, ast.Name) and arg.id in names.classes:
        read.settings["grpo.environment"] = f"{read.functions_file}:{arg.id}"
        read.functions += [arg.id] if arg.id not in read.functions else []
    else:
        read.unread.append(
            f"environment_factory {ast.unparse(arg)} (not a class the script defines at its top level; name the "
            "environment's class in grpo.environment as file.py:Class)"
        )


def _read_functions(arg: ast.expr, key: str, names: Names, read: ScriptRead) -> None:
    """GRPOTrainer's reward_funcs or tools: TRL's rewards by name (trl:accuracy_reward), a reward model by its id
    (model:<id>), and the script's own functions, which init copies into a file beside the experiment."""
    from tunelab.rewards import TRL_REWARDS

    specs = []
    for item in arg.elts if isinstance(arg, ast.List | ast.Tuple) else [arg]:
        text = ast.unparse(item)
        source = names.imported.get(text, text)  # `from trl.rewards import accuracy_reward`, or trl.rewards.x
        value = _literal(item, names)
        if isinstance(item, ast.Name) and item.id in names.defined:
            specs.append(f"{read.functions_file}:{item.id}")
            read.functions += [item.id] if item.id not in read.functions else []
        elif key == "grpo.rewards" and isinstance(value, str):
            specs.append(f"model:{value}")  # a reward model's hub id or folder
        elif key == "grpo.rewards" and re.fullmatch(r"trl\.rewards(\.\w+)*\.(\w+)", source):
            name = source.rpartition(".")[2]
            if name in TRL_REWARDS:
                specs.append(f"trl:{name}")
            else:
                read.unread.append(f"TRL's reward {name} (it takes settings; wrap it in a function of your own)")
        else:
            read.unread.append(
                f"{key.partition('.')[2][:-1]} {text} (not a function the script defines at its top level; name it "
                f"in {key} as file.py:function)"
            )
    if specs:
        read.settings[key] = specs


# Calls whose results a copy of the script's functions leaves out: they load a model, data or a trainer.
LOADERS = re.compile(r"load_dataset|get_peft_model|\w*Trainer|from_pretrained")


def _loads(node: ast.stmt) -> ast.Call | None:
    """The call in an assignment that loads a model, data or a trainer (a tokenizer alone is light: kept)."""
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        if LOADERS.fullmatch(_called(call)) and not re.search(r"Tokenizer|Processor", ast.unparse(call.func)):
            return call
    return None


def _functions_copied(tree: ast.Module, text: str, script: str, names: Names, read: ScriptRead) -> None:
    """The script's reward functions and tools, with the imports, functions and names they use, as a file of their
    own: the script itself cannot be imported, since it trains when it runs."""
    if not read.functions:
        return
    nodes = [
        n
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    nodes += [n for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)]
    binds: dict[ast.stmt, set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            binds[node] = {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            binds[node] = {node.name}
        else:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            binds[node] = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    kept: set[ast.stmt] = set()
    tokenizers: dict[str, str] = {}  # names bound to a model loader's tokenizer: the model id it loads
    wanted = list(read.functions)
    while wanted:
        name = wanted.pop()
        for node, bound in binds.items():
            if name in bound and node not in kept and name not in tokenizers:
                if (loads := _loads(node)) is not None:  # a model, data or trainer: left out, or its tokenizer alone
                    model = _literal(loads.args[0], names) if loads.args else None
                    unpacked = isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
                    elements = [ast.unparse(e) for e in node.targets[0].elts] if unpacked else []
                    if _called(loads) == "from_pretrained" and elements[1:2] == [name] and isinstance(model, str):
                        tokenizers[name] = model  # model, tokenizer = FastLanguageModel.from_pretrained("id", ...)
                    else:
                        read.unread.append(
                            f"{name}, which the copied functions use: the script binds it by "
                            f"{ast.unparse(loads)[:60]}, which loads a model, data or a trainer, so "
                            f"{read.functions_file} leaves it out; define it there"
                        )
                    continue
                kept.add(node)
                wanted += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
                wanted += [
                    n.value.id for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                ]
    lines = text.splitlines()
    parts = []
    for node in sorted(kept, key=lambda n: n.lineno):
        first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        parts.append("\n".join(lines[first - 1 : node.end_lineno]))
    if tokenizers:  # the tokenizer alone, not the model loaded with it
        loaded = [f"{name} = AutoTokenizer.from_pretrained({model!r})" for name, model in tokenizers.items()]
        parts = ["from transformers import AutoTokenizer", "\n".join(loaded), *parts]
    header = (
        f"GRPO's reward functions and tools, copied by `tunelab init --from-script` from {script} with the imports "
        "and names they use (the script itself trains when it is imported)."
    )
    read.functions_source = f'"""{header}"""\n\n' + "\n\n\n".join(parts) + "\n"


def _read_datasets(call: ast.Call, called: str, func: str, names: Names, read: ScriptRead) -> bool:
    """A held-out split the script cuts (train_test_split), and rows it rewrites (dataset.map)."""
    if called == "train_test_split":
        _read_held_out_fraction(call, names, read)
    elif called == "map" and isinstance(call.func, ast.Attribute) and call.args:  # dataset.map(format_row)
        said = (
            f"the rows as {ast.unparse(call.args[0])} rewrites them (.map); tunelab reads the rows as stored and "
            "renders them with the chat template: compare plan's rendered example with the script's"
        )
        read.unread += [said] if said not in read.unread else []  # once for the train and eval rows
    else:
        return False
    return True


def _read_unsloth(call: ast.Call, called: str, func: str, names: Names, read: ScriptRead) -> bool:
    """FastLanguageModel's model and LoRA, with Unsloth's defaults, and its loss and chat-template helpers."""
    if called == "from_pretrained" and UNSLOTH.search(func):
        _read_unsloth_model(call, names, read)
    elif called == "get_peft_model" and UNSLOTH.search(func):
        read.scope = "all-linear"
        said = UNSLOTH_LORA | _said(call, names)
        said.pop("max_seq_length", None)  # get_peft_model's is unused; from_pretrained's is the length
        settings_from(said, read, section="scope.lora")
        _unsloth_rhythm(said, read)
    elif called == "train_on_responses_only":  # the loss on the replies only
        read.loss = "replies"
    elif called == "get_chat_template":  # Unsloth's templates by name
        named = next((ast.unparse(k.value) for k in call.keywords if k.arg == "chat_template"), "its default")
        read.unread.append(
            f"the chat template Unsloth's get_chat_template names ({named}); tunelab keeps the tokenizer's own, or "
            "give tokenizer.chat_template (a .jinja file, or trl:<name>)"
        )
    else:
        return False
    return True


def loss_from(said: dict[str, Any], read: ScriptRead) -> None:
    """SFTConfig's assistant_only_loss / completion_only_loss: what carries the loss, where the script says."""
    if said.get("assistant_only_loss") is True or said.get("completion_only_loss") is True:
        read.loss = "replies"
    elif said.get("completion_only_loss") is False:
        read.loss = "all"


def quantization_from(said: dict[str, Any], read: ScriptRead) -> None:
    """BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...) as model.quantization; a 4-bit setting
    it leaves out is transformers' default, which the script ran with (fp4, no double quantization, float32)."""
    bits = 4 if said.get("load_in_4bit") is True else 8 if said.get("load_in_8bit") is True else None
    if bits is None:
        read.unread += [
            f"{name} ({value.text})"
            for name in ("load_in_4bit", "load_in_8bit")
            if isinstance(value := said.get(name), Computed)
        ]
        return
    read.settings["model.quantization.bits"] = bits
    if bits == 8:
        return
    from transformers import BitsAndBytesConfig

    default = BitsAndBytesConfig(load_in_4bit=True)
    for name, key in QUANTIZATION.items():
        value = said.get(name, getattr(default, name))
        if isinstance(value, Computed):
            read.unread.append(f"{name} ({value.text})")
        else:  # torch.float32 (transformers' default compute dtype) as "float32"
            read.settings[f"model.quantization.{key}"] = (
                str(value).removeprefix("torch.") if key == "compute_dtype" else value
            )


def _read_held_out_fraction(call: ast.Call, names: Names, read: ScriptRead) -> None:
    """dataset.train_test_split(test_size=0.1): that fraction held out for eval (data.eval_fraction)."""
    size = next((k.value for k in call.keywords if k.arg == "test_size"), call.args[0] if call.args else None)
    value = _literal(size, names) if size is not None else _UNREAD
    if isinstance(value, float) and 0 < value < 1:
        read.settings["data.eval_fraction"] = value
    else:
        said = ast.unparse(size) if size is not None else "its default"
        read.unread.append(f"train_test_split's test_size ({said}; tunelab holds out a fraction: data.eval_fraction)")


def defaults_left_out(given: set[str], config: str, read: ScriptRead) -> None:
    """What the script left to the library's defaults ran with those: the installed library's, written out."""
    keys = _defaulted(config)
    for name, value in _library_defaults(config).items():
        if name not in given:
            read.settings.setdefault(keys[name], value)


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


# And a config's own, where tunelab's defaults differ from its (GRPOConfig's 512-token replies).
_CONFIG_DEFAULTED = {
    "GRPOConfig": {"max_completion_length": "grpo.max_completion_length", "num_generations": "grpo.generations"}
}


def _defaulted(config: str) -> dict[str, str]:
    """The settings of `config` whose defaults a script that leaves them out ran with, and their experiment keys."""
    return _DEFAULTED | _CONFIG_DEFAULTED.get(config, {})


def config_defaults(config: type) -> dict[str, Any]:
    """A library config dataclass's settings that have a default value, and that value."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def _library_default(name: str) -> Any:
    """The installed libraries' default of a setting by its name (PEFT's LoraConfig, TrainingArguments, TRL's
    configs); _UNREAD where none of them gives it one."""
    import peft
    import transformers
    import trl

    configs = (trl.SFTConfig, trl.DPOConfig, trl.KTOConfig, trl.GRPOConfig)
    for config in (peft.LoraConfig, transformers.TrainingArguments, *configs):
        defaults = config_defaults(config)
        if name in defaults:
            return defaults[name]
    return _UNREAD


def _library_defaults(called: str) -> dict[str, Any]:
    """The installed library's defaults of `called`'s settings that _defaulted names (PEFT's target_modules default
    is the model's own, q_proj and v_proj on Llama: the qv preset)."""
    if called == "LoraConfig":
        from peft import LoraConfig as config
    else:
        import transformers
        import trl

        config = getattr(trl, called, None) or getattr(transformers, called, None)
        if config is None:  # an experimental trainer's config (ORPO, CPO): its defaults are not read
            return {}
    defaults = {k: v for k, v in config_defaults(config).items() if k in _defaulted(called) and v is not None}
    return defaults | ({"target_modules": "qv"} if called == "LoraConfig" else {})


def _read_unsloth_model(call: ast.Call, names: Names, read: ScriptRead) -> None:
    """FastLanguageModel.from_pretrained(model_name=..., max_seq_length=..., load_in_4bit=True): the model, its
    length, and the 4-bit base Unsloth loads by default (a full fine-tune, full_finetuning=True, loads none)."""
    said = UNSLOTH_LOADS | _said(call, names)
    _read_model_id(call, "model_name", names, read)
    dtype = "auto" if said["dtype"] is None else said["dtype"]  # None: bfloat16 where the GPU has it, else float16
    settings_from({"max_seq_length": said["max_seq_length"], "torch_dtype": dtype}, read)
    _model_settings(said, read)
    if said["full_finetuning"] is True:
        read.scope = "full-ft"
        return
    quantization_from(
        {"load_in_4bit": said["load_in_4bit"], "load_in_8bit": said["load_in_8bit"]}
        | {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": dtype},
        read,
    )
    _unsloth_rhythm(said, read)


def _unsloth_rhythm(said: dict[str, Any], read: ScriptRead) -> None:
    """use_gradient_checkpointing ("unsloth", True or False) and get_peft_model's random_state (the seed)."""
    checkpointing = said["use_gradient_checkpointing"]
    if not isinstance(checkpointing, Computed):
        read.settings["train.gradient_checkpointing"] = "off" if checkpointing is False else "on"
    if isinstance(said.get("random_state"), int):
        read.settings.setdefault("train.seed", said["random_state"])


def _read_model(call: ast.Call, names: Names, read: ScriptRead) -> None:
    _read_model_id(call, "pretrained_model_name_or_path", names, read)
    said = _said(call, names)
    dtype = said.get("torch_dtype", said.get("dtype"))
    if isinstance(dtype, str):
        read.settings["model.dtype"] = dtype
    _model_settings(said, read)


def _read_model_id(call: ast.Call, keyword: str, names: Names, read: ScriptRead) -> None:
    """The model a from_pretrained loads: its first argument, or the keyword its library names it by."""
    given = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == keyword), None)
    if given is not None and isinstance(model := _literal(given, names), str):
        read.model = read.model or model
    elif given is not None:
        read.unread.append(f"the model ({ast.unparse(given)})")


def _model_settings(said: dict[str, Any], read: ScriptRead) -> None:
    """from_pretrained's keywords that are model settings (attn_implementation, revision, trust_remote_code)."""
    for name in (n for n in MODEL_KEYWORDS if n in said):
        if not isinstance(said[name], Computed):
            read.settings[f"model.{name}"] = said[name]


def _read_data(call: ast.Call, names: Names, read: ScriptRead, held_out: bool) -> None:
    """A load_dataset call: its files (the json/csv/parquet builders' data_files) or hub dataset id or folder, with
    the split and subset it reads. `held_out`: the trainer evaluates on its rows."""
    said = {k.arg: k.value for k in call.keywords if k.arg}
    first = _literal(call.args[0], names) if call.args else _literal(said.get("path", ast.Constant(None)), names)
    files = first in FILE_BUILDERS and "data_files" in said
    source = _literal(said["data_files"], names) if files else first
    split = _literal(said["split"], names) if "split" in said else None
    if isinstance(split, str) and re.fullmatch(r"\w[\w.-]*", split) is None:  # train[:1000], train+validation
        read.unread.append(
            f"the split {split!r} (tunelab reads a whole split, or a seeded random part: {{path, split, rows}})"
        )
        split = re.match(r"[\w.-]*", split).group() or None
    if isinstance(source, dict):  # data_files={"train": ..., "test": ...}
        if held_out and isinstance(split, str):
            read.eval_data = source.get(split, read.eval_data)
        else:
            read.data = source.get("train", read.data)
            read.eval_data = next((source[k] for k in HELD_OUT_KEYS if k in source), read.eval_data)
        return
    if source is _UNREAD or not isinstance(source, str | list):
        read.unread.append(f"the data ({ast.unparse(call)})")
        return
    subset = (
        _literal(call.args[1], names) if len(call.args) > 1 else _literal(said.get("name", ast.Constant(None)), names)
    )
    if held_out:
        read.eval_data = read.eval_data or (source if isinstance(source, str) else None)
        if not files and isinstance(split, str):
            read.settings["data.eval_split"] = split
    elif read.data is None:
        read.data = source
        if not files:
            read.split = split if isinstance(split, str) else None
            read.subset = subset if isinstance(subset, str) else None


def settings_from(said: dict[str, Any], read: ScriptRead, method: str | None = None, section: str = "train") -> None:
    """A config's settings as experiment keys: the same name in `section` (train, or scope.lora), or in the
    method's own section (dpo.beta), or the key LIBRARY_NAMES gives a library's name."""
    fields = set((LoraScope if section == "scope.lora" else TrainSettings).model_fields)
    own = set(METHOD_SECTIONS[method].model_fields) if method in METHOD_SECTIONS else set()
    for name, value in said.items():
        if name in NOT_SETTINGS or (name == "max_steps" and isinstance(value, int) and value <= 0):
            continue  # max_steps=-1: TrainingArguments' "no limit", its default
        substitute = None
        if name in own:
            key = f"{method}.{name}"
        elif name in fields:
            key = f"{section}.{name}"
        elif name in LIBRARY_NAMES:
            key, substitute = LIBRARY_NAMES[name].key, LIBRARY_NAMES[name].value
        else:
            if name in NOT_CARRIED and not isinstance(value, Computed) and value != _library_default(name):
                read.unread.append(f"{name}={value!r} (no experiment key: the written experiment trains without it)")
            continue
        if isinstance(value, Computed) and key == "model.dtype" and re.search(r"b(f|float)16_supported", value.text):
            continue  # bf16=is_bfloat16_supported(): bfloat16 where the GPU has it, model.dtype auto's rule
        if isinstance(value, Computed):
            read.unread.append(f"{name} ({value.text})")
        elif key == "scope.lora.layers" and isinstance(value, list) and all(isinstance(i, int) for i in value):
            read.settings[key] = _ranges(value)
        elif key == "scope.lora.init" and value is not True:
            if known_lora_init(value):
                read.settings[key] = value
            else:
                read.unread.append(
                    f"{name}={value!r} (not an init tunelab runs: the written experiment trains without it)"
                )
        elif substitute is None:
            read.settings[key] = value
        elif value is True:  # bf16=True: model.dtype bfloat16
            read.settings[key] = substitute


def _read_chat_template(tree: ast.Module, names: Names, read: ScriptRead) -> None:
    """`tokenizer.chat_template = "{% for message in messages %}..."`: the template the script trains with."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        if any(isinstance(t, ast.Attribute) and t.attr == "chat_template" for t in node.targets):
            value = _literal(node.value, names)
            if isinstance(value, str):
                read.settings["tokenizer.chat_template"] = value
            else:
                read.unread.append(f"the chat template ({ast.unparse(node.value)})")


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
    values = [
        n.value if isinstance(n, ast.Assign) else n.args[0] if n.args else ast.Constant(True)
        for n in ast.walk(tree)
        if (
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Attribute) and t.attr == "requires_grad" for t in n.targets)
        )
        or (isinstance(n, ast.Call) and _called(n) == "requires_grad_")
    ]
    if not any(isinstance(v, ast.Constant) and v.value is True for v in values):
        if any(not isinstance(v, ast.Constant) for v in values):  # requires_grad = any(f"layers.{i}." in name ...)
            read.opens_by = next(f"requires_grad = {ast.unparse(v)}" for v in values if not isinstance(v, ast.Constant))
            return None
        return "full-ft" if read.model else None
    text = ast.unparse(tree)
    starts = [
        _literal(n.slice.lower, Names())
        for n in ast.walk(tree)
        if isinstance(n, ast.Subscript)
        and isinstance(n.slice, ast.Slice)
        and n.slice.lower is not None
        and "layers" in ast.unparse(n.value)
    ]
    last = [-start for start in starts if isinstance(start, int) and start < 0]
    if not last:
        read.opens_by = "requires_grad = True on weights this reader cannot name"
        return None
    read.settings["scope.partial.last_blocks"] = last[0]
    read.settings["scope.partial.norm"] = ".norm." in text or ".norm " in text or "model.norm" in text
    read.settings["scope.partial.lm_head"] = "lm_head" in text
    return "partial-last4"
