"""GRPO's reward functions and tools, as the experiment names them (`grpo.rewards`, `grpo.tools`).

A reward is `file.py:function` (the user's code, resolved against the experiment file), `trl:<name>` (one of
TRL's), or a reward model (a reward run's folder, or model:<hub id or folder>; tunelab.reward_model scores with it).
`plan` checks that each exists without running any of it; `train` imports them and calls them as TRL does, and
turns a reward that raises or answers in the wrong shape into one line that names it. The files' hashes (a reward
model's fingerprint) go into the run's manifest beside the data's, so a resume with changed rewards is refused.

A tool is `file.py:function` too. Its description is printed into every prompt, so `plan` imports the file to read
each tool's signature and docstring (transformers' `get_json_schema`, as TRL renders them) and measures the prompts
with them; a call the model makes runs in the training process, and an exception it raises is the model's to read
(TRL hands `{"error": ...}` back as the tool's result). Tool files are hashed and kept as reward files are.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, TunelabError
from tunelab.reward_model import MODEL_PREFIX, RewardModel, published_config, published_settings

if TYPE_CHECKING:
    from tunelab.config import Quantization

TRL_PREFIX = "trl:"
# TRL's reward functions that take no settings (trl.rewards); the accuracy rewards need the math-verify package
# and read the row's `solution` column.
TRL_REWARDS = {
    "think_format_reward": None,
    "accuracy_reward": "math_verify",
    "reasoning_accuracy_reward": "math_verify",
}


def _split(spec: str, i: int, key: str = "grpo.rewards") -> tuple[Path, str]:
    file, sep, function = spec.rpartition(":")
    if sep and file.endswith(".py") and function.isidentifier():
        return Path(file), function
    if key != "grpo.rewards":
        raise ConfigError(
            f"{_where(key, i)}: '{spec}' names no function; write file.py:function (a function in a Python file beside "
            "the experiment)"
        )
    raise ConfigError(
        f"grpo.rewards[{i}]: '{spec}' names no reward; write file.py:function (a function in a Python file "
        f"beside the experiment), one of {', '.join(TRL_PREFIX + n for n in TRL_REWARDS)}, a reward model (the "
        "folder of a completed run of method: reward, or model:<hub id or folder>)"
    )


def _trl_name(spec: str, i: int) -> str:
    name = spec.removeprefix(TRL_PREFIX)
    if name not in TRL_REWARDS:
        raise ConfigError(
            f"grpo.rewards[{i}]: TRL has no reward '{name}' that takes no settings; use one of "
            f"{', '.join(TRL_PREFIX + n for n in TRL_REWARDS)}, or your own file.py:function"
        )
    needs = TRL_REWARDS[name]
    if needs is not None:
        import importlib.util

        if importlib.util.find_spec(needs) is None:
            raise ConfigError(
                f"grpo.rewards[{i}]: TRL's {name} needs the {needs.replace('_', '-')} package; pip install "
                f"{needs.replace('_', '-')}"
            )
    return name


def check_rewards(specs: list[str], quantization: Quantization | None = None) -> None:
    """Each reward exists: TRL's by name, a file's as a top-level function of the file, read without running it; a
    reward model's config is read. `quantization` (grpo.reward_quantization) needs a published reward model."""
    for i, spec in enumerate(specs):
        if spec.startswith(TRL_PREFIX):
            _trl_name(spec, i)
            continue
        if spec.startswith(MODEL_PREFIX):
            published_config(spec, f"grpo.rewards[{i}]")
            continue
        if _is_run(spec):
            _check_reward_run(spec, i)
            if quantization is not None:
                raise ConfigError(
                    f"grpo.reward_quantization: the reward run '{spec}' (grpo.rewards[{i}]) scores as it trained; "
                    f"export it with `tunelab export {spec} --out FOLDER --merge` and name model:FOLDER in "
                    "grpo.rewards to quantize it"
                )
            continue
        _check_function(spec, i, "grpo.rewards")
    if quantization is not None and not any(spec.startswith(MODEL_PREFIX) for spec in specs):
        raise ConfigError(
            "grpo.reward_quantization: no reward in grpo.rewards is a published reward model (model:<hub id or "
            "folder>), which is what it quantizes; remove it"
        )


def _where(key: str, i: int) -> str:
    """The setting an error names: grpo.rewards[0], grpo.tools[1], grpo.environment (one class)."""
    return key if key == ENVIRONMENT_KEY else f"{key}[{i}]"


def _check_function(spec: str, i: int, key: str) -> None:
    """`file.py:function` names a file that defines the function at its top level, read without running it."""
    file, function = _split(spec, i, key)
    what = {"grpo.rewards": "reward", ENVIRONMENT_KEY: "environment class"}.get(key, "tool")
    if not file.is_file():
        raise ConfigError(
            f"{_where(key, i)}: no file {file}; give the path of the Python file (relative to the experiment file) "
            f"that defines the {what}"
        )
    try:
        tree = ast.parse(file.read_text(), filename=str(file))
    except SyntaxError as e:
        raise ConfigError(f"{_where(key, i)}: {file}:{e.lineno}: invalid Python ({e.msg}); fix the file") from e
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if function not in defined:
        from tunelab.errors import did_you_mean

        functions = sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef))
        raise ConfigError(
            f"{_where(key, i)}: {file} defines no function '{function}'"
            + (did_you_mean(function, functions) if functions else "; define it at the file's top level")
        )


def load_tools(specs: list[str]) -> list[Callable]:
    """The tools, imported, each with a description TRL can print into a prompt (type hints and a Google-style
    docstring, as transformers' get_json_schema reads them)."""
    return [tool for tool, _ in _tools_described(specs)]


def tool_schemas(specs: list[str]) -> list[dict]:
    """Each tool's description as the chat template prints it into a prompt."""
    return [schema for _, schema in _tools_described(specs)]


def _tools_described(specs: list[str]) -> list[tuple[Callable, dict]]:
    described: list[tuple[Callable, dict]] = []
    modules: dict[Path, object] = {}
    for i, spec in enumerate(specs):
        _check_function(spec, i, "grpo.tools")
        tool = _import_function(spec, i, "grpo.tools", modules)
        described.append((tool, _tool_schema(tool, f"grpo.tools[{i}]: {spec}")))
    names = [tool.__name__ for tool, _ in described]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(
            f"grpo.tools: two tools are called {twice[0]}; the model calls a tool by its function's name, so give "
            "each its own"
        )
    return described


ENVIRONMENT_KEY = "grpo.environment"


def load_environment(spec: str) -> type:
    """The environment class `file.py:Class` names, imported as tools are, with a callable `reset` (TRL's
    environment_factory calls the class for each reply's instance)."""
    import inspect

    _check_function(spec, 0, ENVIRONMENT_KEY)
    found = _import_function(spec, 0, ENVIRONMENT_KEY)
    if not inspect.isclass(found):
        raise ConfigError(f"{ENVIRONMENT_KEY}: {spec} is not a class; name the class whose instances replies act in")
    if not callable(getattr(found, "reset", None)):
        raise ConfigError(
            f"{ENVIRONMENT_KEY}: {spec} has no reset method; TRL calls reset(**row) before each reply (return None, or "
            "a string to append to the last user message)"
        )
    return found


def environment_tools(environment: type) -> list[Callable]:
    """The methods a reply may call, as TRL takes them from the class: its public functions but reset and get_reward."""
    import inspect

    return [
        function
        for name, function in inspect.getmembers(environment, predicate=inspect.isfunction)
        if name not in ("reset", "get_reward") and not name.startswith("_")
    ]


def shown_tools(tools: list[str], environment: str | None) -> list[dict]:
    """The descriptions every GRPO prompt shows of what a reply may call: grpo.tools', then grpo.environment's
    methods', as TRL renders them."""
    return tool_schemas(tools) + (environment_schemas(environment) if environment else [])


def environment_schemas(spec: str) -> list[dict]:
    """Each tool method's description as the chat template prints it (read from the class, no instance made), or one
    line that says what its docstring or type hints lack; a class with none is refused."""
    import types

    environment = load_environment(spec)
    schemas = [  # each bound to a stand-in, so that the description leaves out `self`
        _tool_schema(types.MethodType(function, object()), f"{ENVIRONMENT_KEY}: {spec}.{function.__name__}")
        for function in environment_tools(environment)
    ]
    if not schemas:
        raise ConfigError(
            f"{ENVIRONMENT_KEY}: {spec} has no public method besides reset and get_reward, so a reply has nothing to "
            "call; add the tools as methods"
        )
    return schemas


def _tool_schema(tool: Callable, where: str) -> dict:
    """The description of a tool the chat template prints (transformers' get_json_schema), or one line, starting
    with `where` (the setting and the tool), that says what its docstring or type hints lack."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        raise ConfigError(
            f"{where}: {e}; the prompt describes a tool from its type hints and Google-style docstring (a summary "
            "line, then Args: with one line per argument)"
        ) from e


def _is_run(spec: str) -> bool:
    """A reward named by a tunelab run folder (a reward model), not by a file's function."""
    from tunelab.runs import run_status

    return not spec.startswith(TRL_PREFIX) and run_status(Path(spec)) is not None


def reward_models(specs: list[str]) -> list[str]:
    """The reward models among the rewards: reward runs' folders and published ones (model:<id>)."""
    return [spec for spec in specs if spec.startswith(MODEL_PREFIX) or _is_run(spec)]


def _check_reward_run(spec: str, i: int) -> None:
    from tunelab.config import model_head
    from tunelab.runs import read_manifest, unfinished

    manifest = read_manifest(Path(spec))
    if model_head(manifest.method or "") != "score":
        raise ConfigError(
            f"grpo.rewards[{i}]: run '{spec}' trained method {manifest.method}, not a reward model; name a run of "
            "method: reward, or a file.py:function"
        )
    if (why := unfinished(Path(spec), manifest)) is not None:
        raise ConfigError(f"grpo.rewards[{i}]: the reward model '{spec}' {why}, or name another")


def function_hashes(specs: list[str]) -> dict[str, str]:
    """sha256 prefix of each reward's (or tool's) file (TRL's reward: TRL's version; a reward model: its run's or its
    weights' fingerprint), by the function as named."""
    from importlib.metadata import version

    from tunelab.models import fingerprint, run_fingerprint, weights_path

    out = {}
    for i, spec in enumerate(specs):
        if spec.startswith(TRL_PREFIX):
            out[spec] = f"trl {version('trl')}"
        elif _is_run(spec):
            out[spec] = f"run {run_fingerprint(Path(spec))}"
        elif spec.startswith(MODEL_PREFIX):
            settings = published_settings(spec)
            out[spec] = f"model {fingerprint(weights_path(settings), settings.revision)}"
        else:
            out[spec] = hashlib.sha256(_split(spec, i)[0].read_bytes()).hexdigest()[:16]
    return out


KEPT = "rewards"  # the run folder's copies of its reward files
KEPT_TOOLS = "tools"  # and of its tool files


def _is_file(spec: str) -> bool:
    """A reward that is a function in the user's file (not TRL's, not a reward model)."""
    return not spec.startswith((TRL_PREFIX, MODEL_PREFIX)) and not _is_run(spec)


def _copies(specs: list[str], run_dir: Path, kept: str = KEPT) -> dict[Path, Path]:
    """Each reward (or tool) file and where the run keeps its copy, in the folder `kept` (two files of one name,
    a/rewards.py and b/rewards.py, told apart by their paths)."""
    files = sorted({_split(spec, i)[0] for i, spec in enumerate(specs) if _is_file(spec)})
    names = [f.name for f in files]
    out = {}
    for file in files:
        tag = "" if names.count(file.name) == 1 else hashlib.sha256(str(file).encode()).hexdigest()[:8] + "-"
        out[file] = run_dir / kept / f"{tag}{file.name}"
    return out


def keep_copies(specs: list[str], run_dir: Path, kept: str = KEPT) -> None:
    """A copy of each reward (or tool) file in the run's folder `kept` (rewards/, tools/), as it trains: the
    manifest's hashes say whether the file changed since, the copy what it was."""
    from tunelab.runs import write_atomic

    if not (copies := _copies(specs, run_dir, kept)):
        return
    (run_dir / kept).mkdir(exist_ok=True)
    for file, copy in copies.items():
        write_atomic(copy, file.read_text())


def as_trained(specs: list[str], run_dir: Path, recorded: dict[str, str] | None, kept: str = KEPT) -> list[str]:
    """The rewards (or tools) as the run trained with them: each file as named where it still has the hash the run
    `recorded` (it may import the helpers beside it), else the copy the run kept in `kept` (the file changed or moved
    since)."""
    copies = _copies(specs, run_dir, kept)
    now = {}
    for spec in specs:
        if _is_file(spec) and Path(spec.rpartition(":")[0]).is_file():
            now |= function_hashes([spec])
    out = []
    for i, spec in enumerate(specs):
        if not _is_file(spec) or (recorded or {}).get(spec) in (None, now.get(spec)):
            out.append(spec)
            continue
        file, function = _split(spec, i)
        out.append(f"{copies[file]}:{function}" if copies[file].is_file() else spec)
    return out


def load_rewards(specs: list[str], quantization: Quantization | None = None) -> list[Callable]:
    """The reward functions, each wrapped so that a failure or a wrong answer names it (and keeps its name, which
    TRL logs its mean under: rewards/<name>/mean); published reward models quantized where `quantization` says."""
    check_rewards(specs, quantization)
    return [_checked(_load(spec, i, quantization), spec, i) for i, spec in enumerate(specs)]


def _load(spec: str, i: int, quantization: Quantization | None) -> Callable:
    if spec.startswith(TRL_PREFIX):
        import trl.rewards

        return getattr(trl.rewards, _trl_name(spec, i))
    if spec.startswith(MODEL_PREFIX):
        return RewardModel(spec, quantization=quantization)
    if _is_run(spec):
        return RewardModel(spec)
    return _import_function(spec, i, "grpo.rewards")


def _import_function(spec: str, i: int, key: str, modules: dict[Path, object] | None = None) -> Callable:
    """The function `file.py:function` names, its file imported as `python file.py` would (its folder on the import
    path while it loads, so it may import the helpers beside it). `modules`: files imported already, by path, so
    functions of one file share its state."""
    import importlib.util

    file, function = _split(spec, i, key)
    module = (modules or {}).get(file)
    if module is None:
        prefix = "tunelab_reward" if key == "grpo.rewards" else "tunelab_tool"
        name = f"{prefix}_{i}_{hashlib.sha256(str(file).encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, file)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        # As `python rewards.py` would, the file's folder is on the import path while it loads: rewards may import
        # the helpers beside them.
        folder = str(file.parent)
        sys.path.insert(0, folder)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise TunelabError(f"{_where(key, i)}: importing {file} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.remove(folder)
        if modules is not None:
            modules[file] = module
    found = getattr(module, function)
    if not callable(found):
        raise ConfigError(f"{_where(key, i)}: {file}'s {function} is not a function")
    return found


def _checked(reward: Callable, spec: str, i: int) -> Callable:
    import inspect

    if inspect.iscoroutinefunction(reward) or inspect.iscoroutinefunction(type(reward).__call__):
        return reward  # TRL gathers async rewards itself

    @functools.wraps(reward)
    def call(*args, **kwargs):
        completions = kwargs.get("completions", args[1] if len(args) > 1 else [])
        try:
            scores = reward(*args, **kwargs)
        except Exception as e:
            raise TunelabError(f"grpo.rewards[{i}]: {spec} raised {type(e).__name__}: {e}") from e
        if not isinstance(scores, list | tuple) or len(scores) != len(completions):
            got = f"{len(scores)} values" if isinstance(scores, list | tuple) else type(scores).__name__
            raise TunelabError(
                f"grpo.rewards[{i}]: {spec} returned {got} for {len(completions)} completions; return one float "
                "(or None where it does not apply) per completion"
            )
        bad = next((s for s in scores if s is not None and not isinstance(s, int | float)), None)
        if bad is not None:
            raise TunelabError(
                f"grpo.rewards[{i}]: {spec} returned a {type(bad).__name__} ({bad!r:.40}); return floats (or None)"
            )
        return [None if s is None else float(s) for s in scores]

    if not hasattr(reward, "__name__"):  # a callable object: TRL names its logged mean by the class
        call.__name__ = type(reward).__name__
    return call
