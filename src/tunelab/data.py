"""Read datasets, detect their format, validate every record and normalise it.

Normalised rows are what TRL expects: `{"messages": [...]}` for chats (ShareGPT and Alpaca are
converted), `{"prompt", "completion"}`, `{"text"}`, or `{"prompt", "chosen", "rejected"}` for
preference pairs. Every error names the file and the line (or record number).
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import io
import json
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import DataSettings, DataSource
from tunelab.errors import ConfigError, TunelabError
from tunelab.templates import REASONING_FIELDS  # an assistant message's reasoning: passed through as it is

ROLES = ("system", "user", "assistant", "tool")
# OpenAI's chat format names the system message "developer" for its reasoning models; templates know it as system.
DEVELOPER = {"developer": "system"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # LLaMA-Factory's tool calls: the value is {"name", "arguments"} as JSON
    "observation": "tool",  # and the tool's result
    "tool": "tool",  # NousResearch/hermes-function-calling-v1's tool results
}
SFT_FORMATS = ("messages", "conversations", "prompt_completion", "text", "alpaca")
FORMAT_FIELDS = {
    "preference": "chosen/rejected",
    "unpaired": "prompt/completion/label",
    "messages": "messages",
    "conversations": "conversations",
    "prompt_completion": "prompt/completion",
    "alpaca": "instruction/output (or instruction/context/response)",
    "text": "text",
    "prompt": "prompt (GRPO, distill; the row's other fields go to GRPO's rewards)",
}


@dataclass
class Record:
    where: str  # "file:line" or "file#record"
    value: Any


@dataclass
class Split:
    rows: list[dict]
    source: str  # its sources, each with the sample taken of it where it took one
    origins: list[str]  # where each row comes from: "file:line" or "file#record"
    sampled: bool = False  # a source gave a random part of its rows


@dataclass
class Splits:
    format: str
    train: Split
    eval: Split | None
    hashes: dict[str, str]  # source -> sha256 prefix of the bytes read (hub datasets and folders: "hub-or-folder")
    also: dict[str, Split] = field(default_factory=dict)  # data.eval_also: more held-out sets, by name

    def sampled_from(self) -> str | None:
        """Where the rows come from, when a source gave a sample of its rows (as plan shows it); else None."""
        if not (self.train.sampled or (self.eval and self.eval.sampled)):
            return None
        return f"train from {self.train.source}" + (f"; eval from {self.eval.source}" if self.eval else "")


# ---------------------------------------------------------------- reading


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    with io.StringIO(text, newline=None) as f:  # lines as a text file splits them, not at U+2028 inside strings
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                # json's own words may end in "at" ("Unterminated string starting at")
                raise TunelabError(
                    f"{path}:{n}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
                ) from e
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TunelabError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    return [Record(f"{path}#{i + 1}", r) for i, r in enumerate(data)]


def _read_csv(path: Path, text: str) -> list[Record]:
    with io.StringIO(text, newline="") as f:
        # Line 1 is the header, so record i sits on line i + 2 (for records without embedded newlines).
        return [
            Record(f"{path}:{i + 2}", {k: _csv_cell(k, v) for k, v in r.items()})
            for i, r in enumerate(csv.DictReader(f))
        ]


def _csv_cell(name: str, text: str | None) -> Any:
    """A CSV cell as the value JSON would have held: a conversation written as JSON text, or as the Python repr pandas
    writes for a column of lists, is parsed where it holds messages, and a KTO label's True/False is a boolean. Other
    text stays text."""
    if name == "label" and text is not None and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    if not text or not text.lstrip().startswith("["):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:  # pandas writes a column of lists as their Python repr ({'role': 'user', ...}); read as a literal only
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
    turns = (
        isinstance(value, list) and value and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in value)
    )
    return value if turns else text


def _read_with_datasets(
    source: str,
    split: str,
    key: str,
    revision: str | None = None,
    split_key: str | None = None,
    subset: str | None = None,
) -> tuple[list[Record], str]:
    """A parquet file, a folder (saved with `save_to_disk`, or a dataset repository's files as the hub holds them) or a
    hub dataset id, read with `datasets`; the digest is of the records themselves."""
    import datasets

    revision = None if Path(source).exists() else revision  # a hub id's; a local folder has none
    split_key = split_key or ("data.eval_split" if held_out_key(key) else "data.hub_split")
    try:
        # datasets 5.2 keys its cache of a local dataset repository by the folder's name and README, not by its files:
        # after an edit of its data files, or for another folder of the same name, it returned the rows it had cached
        # before. Local sources are read through a cache of their own, gone once their rows are read.
        with tempfile.TemporaryDirectory(prefix="tunelab-data-") as cache:
            ds = _open_with_datasets(source, split, split_key, revision, cache, key, subset)
            records = [Record(f"{source}#{i + 1}", r) for i, r in enumerate(ds)]
    except ValueError as e:
        if (subsets := _subsets_refusal(e, source, subset, revision)) is not None:
            alone = f", or {key}.subset for this source alone" if "[" in key else ""
            raise ConfigError(f"{source}: {subsets}: set data.subset{alone}") from e
        if str(e).startswith("Unknown split"):
            names = ", ".join(datasets.get_dataset_split_names(source, subset, revision=revision))
            raise ConfigError(f"{source}: has no split '{split}'; its splits are {names}: set {split_key}") from e
        raise TunelabError(f"{source}: cannot load dataset ({str(e).splitlines()[0]})") from e
    except (OSError, KeyError) as e:
        raise _load_refusal(key, source, e) from e
    return records, _records_digest(records)


def _load_refusal(key: str, source: str, error: Exception) -> TunelabError:
    """A dataset datasets could not load, as one line: not cached with the hub out of reach (ConnectionError, offline
    set or found), gated, or datasets' own first line."""
    from tunelab.models import gated_refusal

    if isinstance(error, ConnectionError):
        return ConfigError(
            f"{key}: '{source}' is not in the local cache and the hub cannot be reached; download it where there is "
            f"a network (hf download {source} --repo-type dataset --local-dir FOLDER) and point {key} at that folder"
        )
    return gated_refusal(key, source, error, "dataset") or TunelabError(
        f"{source}: cannot load dataset ({str(error).splitlines()[0]})"
    )


def held_out_key(key: str) -> bool:
    """Whether the setting `key` names held-out data (data.eval, data.eval_also.<name>): its split defaults to
    data.eval_split."""
    return key == "data.eval" or key.startswith("data.eval_also.")


def _subsets_refusal(error: ValueError, source: str, subset: str | None, revision: str | None = None) -> str | None:
    """What datasets' error says when it is about the dataset's subsets (configs): which it has, or None."""
    import datasets

    if not (str(error).startswith("Config name is missing") or "BuilderConfig" in str(error)):
        return None
    names = ", ".join(datasets.get_dataset_config_names(source, revision=revision))
    return f"{f'has no subset {subset!r}' if subset else 'has several subsets'}; its subsets are {names}"


def _open_with_datasets(
    source: str, split: str, split_key: str, revision: str | None, cache: str, key: str, subset: str | None = None
):
    """The split (of `subset`, the dataset's config, where it has several) as a `datasets.Dataset`; local files go
    through `cache`, hub datasets through the usual cache (offline: their cached snapshot at the revision asked for,
    read as a local folder)."""
    import datasets
    from huggingface_hub import constants

    from tunelab.models import offline_unless_reachable

    path = Path(source)
    if _saved_with_datasets(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(
                    f"{source}: the saved dataset has no split '{split}'; its splits are {', '.join(ds)}: set "
                    f"{split_key} to one of them"
                )
            ds = ds[split]
        return ds
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path), cache_dir=cache)
    if path.is_dir():  # a folder laid out as a dataset repository (data files, README.md configs)
        return datasets.load_dataset(source, subset, split=split, cache_dir=cache)
    offline_unless_reachable(source, "dataset")
    if constants.HF_HUB_OFFLINE:
        return datasets.load_dataset(_cached_snapshot(source, revision, key), subset, split=split, cache_dir=cache)
    return datasets.load_dataset(source, subset, split=split, revision=revision)


def _cached_snapshot(source: str, revision: str | None, key: str) -> str:
    """Without the hub: a dataset's files as the hub cache holds them at `revision` (the default branch without one).

    datasets' own offline fallback reads the latest copy it prepared, whatever revision that was: a run pinned to
    data.revision would silently read another revision's rows.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(source, repo_type="dataset", revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as e:
        from tunelab.models import uncached_refusal

        raise uncached_refusal(key, source, revision, repo_type="dataset") from e


def dataset_splits(source: str, subset: str | None = None) -> list[str] | None:
    """The split names of a folder or hub dataset (of `subset`, where it has several); None for a file or a single
    saved dataset (which has no splits)."""
    path = Path(source)
    if path.is_file() or (path / "state.json").is_file():
        return None
    if (path / "dataset_dict.json").is_file():
        return json.loads((path / "dataset_dict.json").read_text())["splits"]
    _refuse_missing(source, "--data", "the current folder")
    import datasets

    from tunelab.models import offline_unless_reachable

    offline_unless_reachable(source, "dataset")
    try:
        return datasets.get_dataset_split_names(source, subset)
    except ValueError as e:
        if (subsets := _subsets_refusal(e, source, subset)) is not None:
            raise TunelabError(f"--data: '{source}' {subsets}; give --subset NAME") from e
        raise _load_refusal("--data", source, e) from e
    except OSError as e:
        raise _load_refusal("--data", source, e) from e


HELD_OUT = ("test", "validation", "valid", "eval", "dev")


def train_and_held_out(splits: list[str], train: str | None = None) -> tuple[str | None, str | None]:
    """The split to train on (`train` if given, else "train", the one train_* split, or the only split) and the
    held-out split that goes with it (test_sft beside train_sft, else test, validation, ...); None where there is no
    such split."""
    prefixed = [s for s in splits if s.startswith("train")]
    if train is None and "train" in splits:
        train = "train"
    elif train is None:
        train = prefixed[0] if len(prefixed) == 1 else splits[0] if len(splits) == 1 else None
    suffix = train.removeprefix("train") if train else ""
    candidates = [name + suffix for name in HELD_OUT] + list(HELD_OUT)
    return train, next((c for c in candidates if c in splits and c != train), None)


def _saved_with_datasets(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _records_digest(records: list[Record]) -> str:
    """The records' content, for sources whose bytes are not one file (folders, hub datasets): the same rows give the
    same digest wherever and however they are stored."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.value, sort_keys=True, ensure_ascii=False, default=_stable).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _stable(value: Any) -> str:
    """A value JSON has no type for, by its content: bytes, and images or arrays (datasets decodes an image column to
    PIL images, whose str() holds a memory address), by their bytes; anything else (dates, decimals) as its str()."""
    if isinstance(value, bytes | bytearray):
        return hashlib.sha256(value).hexdigest()
    if hasattr(value, "tobytes"):
        return hashlib.sha256(value.tobytes()).hexdigest()
    return str(value)


TEXT_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_records(
    source: str,
    key: str,
    split: str = "train",
    revision: str | None = None,
    split_key: str | None = None,
    subset: str | None = None,
) -> tuple[list[Record], str]:
    """The records of a data source and the digest of its bytes, from one read of the file. `split_key`: the setting
    that names `split`, for the error when there is no such split (default: data.hub_split or data.eval_split);
    `subset`: a folder's or hub dataset's config, where it has several."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        compressed = suffix == ".gz"
        if compressed:  # data.jsonl.gz: the reader of the inner suffix, over the decompressed bytes
            suffix = Path(path.stem).suffix.lower()
        if suffix in TEXT_READERS:
            raw = path.read_bytes()
            digest = _digest(raw)
            if compressed:
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as e:
                    raise TunelabError(f"{source}: not a readable gzip file ({e}); recompress or decompress it") from e
            try:
                # utf-8-sig: files saved by Windows tools start with a byte-order mark, which is not part of the data.
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise TunelabError(
                    f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8"
                ) from e
            return TEXT_READERS[suffix](path, text), digest
        if suffix == ".parquet":
            return _read_with_datasets(source, split, key)[0], _digest(path.read_bytes())
        raise TunelabError(
            f"{source}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv (each may be .gz) or .parquet"
        )
    _refuse_missing(source, key, "the experiment file's folder")
    return _read_with_datasets(source, split, key, revision, split_key, subset)


def written_as_path(source: str) -> bool:
    """A data source written as a file path (a suffix, or a path from /, . or ~), which no hub dataset id is."""
    return Path(source).suffix != "" or source.startswith(("/", ".", "~"))


def _refuse_missing(source: str, key: str, relative_to: str) -> None:
    """A source that is neither a file, a folder nor shaped as a hub id (owner/name) is a file that is missing.
    `relative_to`: where a relative path was read from, said when the path is relative."""
    path = Path(source)
    if not path.exists() and (written_as_path(source) or source.count("/") != 1):
        where = "" if path.expanduser().is_absolute() else f" (a relative path is read from {relative_to})"
        raise ConfigError(f"{key}: data file '{source}' not found{where}")


# ---------------------------------------------------------------- formats


def detect_format(record: Record, accepted: tuple[str, ...] | None = None) -> str:
    """The record's format, from its fields. A record may fit several (HuggingFaceH4/ultrafeedback_binarized's rows
    hold preference pairs and the chosen conversation as `messages`): the first that `accepted` (the method's
    formats) names, else the first."""
    value = record.value
    if not isinstance(value, dict):
        raise TunelabError(f"{record.where}: a record must be a JSON object, got {type(value).__name__}")
    keys = set(value)
    fits = [fmt for fmt, needed in FORMAT_KEYS if needed <= keys]
    if "unpaired" in fits:  # a label says which completions are unwanted: never SFT on all of them
        fits.remove("prompt_completion")
    if not fits:
        raise TunelabError(
            f"{record.where}: cannot tell the data format from fields {sorted(keys)}; expected one of: "
            + ", ".join(FORMAT_FIELDS.values())
            + f"; or rename yours with {_columns_hint(value)}"
        )
    return next((fmt for fmt in fits if accepted is None or fmt in accepted), fits[0])


# Field names datasets give a prompt and its answer (openai/gsm8k's question/answer, MetaMathQA's query/response,
# HelpSteer's prompt/response, ...), in the order a hint pairs them.
PROMPT_NAMES = ("prompt", "question", "query", "problem", "instruction", "input")
ANSWER_NAMES = ("completion", "answer", "response", "solution", "output")
# A preferred and a rejected answer named otherwise: lvwerra/stack-exchange-paired's (response_j is the better),
# argilla/ultrafeedback-binarized-preferences'.
PAIR_NAMES = (("response_j", "response_k"), ("chosen_response", "rejected_response"))
# A system prompt beside them (Open-Orca/OpenOrca's system_prompt), which only the chat format has a place for.
SYSTEM_NAMES = ("system", "system_prompt", "system_message")


def _columns_hint(value: dict) -> str:
    """The data.columns that would read a record of unknown fields, where its fields say: a list of {role, content}
    or {from, value} turns under another name (lmsys-chat-1m's `conversation`), or a prompt and an answer."""
    for name, field_value in value.items():
        turns = field_value if isinstance(field_value, list) and field_value else None
        if turns and all(isinstance(t, dict) for t in turns):
            if all({"role", "content"} <= set(t) for t in turns):
                return f"data.columns: {{{name}: messages}}"
            if all({"from", "value"} <= set(t) for t in turns):
                return f"data.columns: {{{name}: conversations}}"
    prompt = next((n for n in PROMPT_NAMES if isinstance(value.get(n), str)), None)
    pair = next((p for p in PAIR_NAMES if all(isinstance(value.get(n), str) for n in p)), None)
    answer = next((n for n in ANSWER_NAMES if isinstance(value.get(n), str)), None)
    system = next((n for n in SYSTEM_NAMES if isinstance(value.get(n), str) and value[n].strip()), None)
    if prompt and (pair or answer):
        names = ((prompt, "prompt"), *zip(pair, ("chosen", "rejected"), strict=True)) if pair else (
            (prompt, "prompt"), (answer, "completion"),
        )  # fmt: skip
        renames = [f"{old}: {new}" for old, new in (*names, (system, "system")) if old and old != new]
        chat = " and data.as_chat: true (the system prompt then opens each chat)" if system else ""
        return "data.columns: {" + ", ".join(renames) + "}" + chat
    return "data.columns (e.g. {question: prompt, answer: completion})"


# The fields that make each format, in the order a record that fits several is read when its method takes any.
FORMAT_KEYS: tuple[tuple[str, set[str]], ...] = (
    ("preference", {"chosen", "rejected"}),
    ("unpaired", {"prompt", "completion", "label"}),
    ("messages", {"messages"}),
    ("conversations", {"conversations"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("alpaca", {"instruction", "output"}),
    ("alpaca", {"instruction", "response"}),  # Dolly: instruction, context, response
    ("text", {"text"}),
    ("prompt", {"prompt"}),  # prompts for GRPO; any other field is the reward functions' to read
)


def _field(record: Record, name: str, kinds: tuple[type, ...] = (str,)) -> Any:
    value = record.value.get(name)
    if value is None:
        raise TunelabError(f"{record.where}: record has no '{name}' field")
    if not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise TunelabError(f"{record.where}: '{name}' must be {want}, got {type(value).__name__}")
    return value


def _messages(record: Record, value: Any, name: str, need_assistant: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise TunelabError(f"{record.where}: '{name}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise TunelabError(f"{record.where}: {name}[{i}] must have 'role' and 'content'")
        role = DEVELOPER.get(m["role"], m["role"])
        if role not in ROLES:
            raise TunelabError(
                f"{record.where}: {name}[{i}] has unknown role '{m['role']}'; roles are {', '.join(ROLES)}"
            )
        content = m.get("content")
        if content is None and calls:
            content = ""  # OpenAI's shape: a turn that only calls tools has content null
        if isinstance(content, list):
            content = _text_parts(record, content, f"{name}[{i}]")
        if not isinstance(content, str):
            raise TunelabError(f"{record.where}: {name}[{i}].content must be a string")
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = _tool_calls(record, calls, f"{name}[{i}]", role)
        for key in REASONING_FIELDS:
            if m.get(key) is not None:
                if m["role"] != "assistant" or not isinstance(m[key], str):
                    raise TunelabError(f"{record.where}: {name}[{i}].{key} must be a string, on assistant messages")
                message[key] = m[key]
        if m["role"] == "tool":
            message |= {k: m[k] for k in ("name", "tool_call_id") if m.get(k) is not None}
        # OpenAI's fine-tuning format: weight 0 keeps an assistant turn out of the loss. (A column datasets fills
        # with null where a message has no weight is no weight.)
        if m.get("weight") is not None:
            if m["weight"] not in (0, 1) or m["role"] != "assistant":
                raise TunelabError(f"{record.where}: {name}[{i}].weight must be 0 or 1, on assistant messages only")
            message["weight"] = int(m["weight"])
        says_nothing = m["role"] == "assistant" and not content.strip() and not calls
        if need_assistant and says_nothing and message.get("weight", 1):
            raise TunelabError(
                f"{record.where}: {name}[{i}] is an empty assistant reply, which would teach the model to say "
                'nothing; fill in the reply, remove the record, or give the message "weight": 0'
            )
        out.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise TunelabError(f"{record.where}: '{name}' has no assistant message, so nothing would be learned")
    return out


def _text_parts(record: Record, parts: list, where: str) -> str:
    """Content given as parts ([{"type": "text", "text": ...}], OpenAI's and Transformers' multimodal shape) as the
    text they hold, joined as chat templates join them; tunelab trains on text, so other parts are refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise TunelabError(
                f"{record.where}: {where}.content[{j}] "
                + (f"is a part of type {kind!r}" if kind else "is not a typed part")
                + "; "
                'tunelab trains on text: give content as a string or as {"type": "text", "text": ...} parts'
            )
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(record: Record, calls: Any, where: str, role: str) -> list[dict]:
    """An assistant turn's tool calls as chat templates read them: {"type": "function", "function": {"name",
    "arguments"}} with the arguments as an object (OpenAI's data holds them as a JSON string)."""
    if role != "assistant" or not isinstance(calls, list):
        raise TunelabError(f"{record.where}: {where}.tool_calls must be a list, on assistant messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise TunelabError(
                f'{record.where}: {where}.tool_calls[{j}] must be {{"type": "function", "function": '
                '{"name": ..., "arguments": {...}}}'
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise TunelabError(
                    f"{record.where}: {where}.tool_calls[{j}].function.arguments is not valid JSON ({e.msg})"
                ) from e
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call, dict) and call.get("id") is not None:
            entry["id"] = call["id"]
        out.append(entry)
    return out


def row_tools(record: Record) -> list[dict] | None:
    """A row's tool definitions (JSON schemas the template prints for the model), from a list or a JSON string."""
    tools = record.value.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TunelabError(f"{record.where}: 'tools' is not valid JSON ({e.msg})") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise TunelabError(f"{record.where}: 'tools' must be a list of tool definitions (JSON schema objects)")
    return tools or None


def _with_tools(row: dict, tools: list[dict] | None) -> dict:
    return row | {"tools": tools} if tools else row


def _conversation_tools(record: Record, row: dict) -> dict:
    """A prompt-and-answers row (prompt/completion, a preference pair, KTO's thumbs) with the record's tool
    definitions, which the chat template prints into the conversation: its prompt must be one."""
    tools = row_tools(record)
    if tools and not isinstance(row["prompt"], list):
        parts = ["prompt", *(k for k in ANSWERS if k in row)]
        raise TunelabError(
            f"{record.where}: 'tools' needs a conversation to print them into; give {', '.join(parts[:-1])} and "
            f"{parts[-1]} as message lists"
        )
    return _with_tools(row, tools)


def merge_consecutive(messages: list[dict]) -> list[dict]:
    """Join consecutive messages of the same role (blank line between), for templates that need alternation."""
    out: list[dict] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            merged = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
            if "weight" in out[-1] or "weight" in m:
                merged["weight"] = max(out[-1].get("weight", 1), m.get("weight", 1))
            out[-1] = merged
        else:
            out.append(dict(m))
    return out


def _sharegpt(record: Record) -> list[dict]:
    turns = _field(record, "conversations", (list,))
    if turns and all(isinstance(t, dict) and "role" in t and "from" not in t for t in turns):
        return _messages(record, turns, "conversations", need_assistant=True)  # OpenAI's turns under this name
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise TunelabError(f"{record.where}: conversations[{i}] must have 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise TunelabError(
                f"{record.where}: conversations[{i}] has unknown role '{t['from']}'; roles are "
                + ", ".join(SHAREGPT_ROLES)
            )
        if t["from"] == "function_call":
            message = {"role": "assistant", "content": None, "tool_calls": _sharegpt_calls(record, t, i)}
        else:
            message = {"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]}
        # SlimOrca and axolotl's ShareGPT weigh turns as OpenAI's format does: 0 keeps a reply out of the loss. A
        # prompt turn weighed 0 (or null) is what it is anyway; one weighed 1 is refused where messages are read.
        weight = t.get("weight")
        if weight is not None and (message["role"] == "assistant" or weight != 0):
            message["weight"] = weight
        messages.append(message)
    return _messages(record, messages, "conversations", need_assistant=True)


def _sharegpt_calls(record: Record, turn: dict, i: int) -> list[dict]:
    """A function_call turn's value, one call object or a list of them, as OpenAI-shaped tool calls."""
    try:
        value = json.loads(turn["value"]) if isinstance(turn["value"], str) else turn["value"]
    except json.JSONDecodeError as e:
        raise TunelabError(f"{record.where}: conversations[{i}] (function_call) is not valid JSON ({e.msg})") from e
    return value if isinstance(value, list) else [value]  # _tool_calls reads bare {"name", "arguments"} too


def _alpaca(record: Record) -> list[dict]:
    """Alpaca's instruction/input/output, or Dolly's instruction/context/response, as one exchange."""
    instruction = _field(record, "instruction")
    dolly = "output" not in record.value
    extra = record.value.get("context" if dolly else "input") or ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    reply = _field(record, "response" if dolly else "output")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _response(record: Record, name: str) -> str | list[dict]:
    value = _field(record, name, (str, list))
    if isinstance(value, list):
        value = _messages(record, value, name, need_assistant=False)
        if not any(m["content"].strip() or m.get("tool_calls") for m in value if m["role"] == "assistant"):
            raise TunelabError(f"{record.where}: '{name}' has an empty response")
    elif not value.strip():
        raise TunelabError(f"{record.where}: '{name}' is empty")
    return value


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_transcript(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript as messages, or None."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _preference(record: Record) -> dict:
    value = record.value
    if "prompt" not in value and isinstance(value.get("question"), str):  # Intel/orca_dpo_pairs names it question
        value = {**value, "prompt": value["question"]}
        record = Record(record.where, value)
    if isinstance(value.get("chosen"), str) and isinstance(value.get("rejected"), str) and "prompt" not in value:
        chosen_hh, rejected_hh = hh_transcript(value["chosen"]), hh_transcript(value["rejected"])
        if chosen_hh and rejected_hh:
            record = Record(record.where, {"chosen": chosen_hh, "rejected": rejected_hh})
    chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    if chosen == rejected:
        raise TunelabError(f"{record.where}: chosen and rejected are identical, so the pair teaches nothing")
    if isinstance(chosen, list) and isinstance(rejected, list) and chosen[0]["role"] != "assistant":
        # UltraFeedback-binarized and HH shapes: both sides are whole conversations that repeat the prompt,
        # so the shared prefix is the prompt (a separate "prompt" string, if any, is that prefix's last turn).
        return _implicit_prompt(record, chosen, rejected)
    if "prompt" in record.value:
        prompt = _field(record, "prompt", (str, list))
        if isinstance(prompt, list):
            prompt = _messages(record, prompt, "prompt", need_assistant=False)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise TunelabError(
            f"{record.where}: record has no 'prompt' field (an implicit prompt needs chosen and "
            "rejected as message lists that share the conversation prefix, or Anthropic HH transcripts)"
        )
    return _implicit_prompt(record, chosen, rejected)


def _implicit_prompt(record: Record, chosen: list[dict], rejected: list[dict]) -> dict:
    """The shared conversation prefix is the prompt; the rest are the two answers."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise TunelabError(
            f"{record.where}: chosen and rejected share no conversation prefix to use as the prompt; "
            "add a 'prompt' field"
        )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def normalise(record: Record, fmt: str, merge_turns: bool = False, as_chat: bool = False) -> dict:
    row = _normalise(record, fmt)
    # What trains: the prompt and the answers; a GRPO row's other fields are the rewards', left as they are.
    turns = ("prompt",) if fmt == "prompt" else ("messages", "prompt", *ANSWERS)
    if as_chat:
        row = _as_chat(record, row, [k for k in ANSWERS if k in turns])
    elif isinstance(row.get("prompt"), str) and record.value.get("system"):
        raise TunelabError(
            f"{record.where}: has a 'system' text, which plain-text rows have no place for (they train as raw "
            "text); set data.as_chat: true to make it the system turn of the chat format, or remove the field"
        )
    parts = [k for k in turns if k in row and k != "messages"]
    if len({isinstance(row[k], list) for k in parts}) > 1:
        raise TunelabError(
            f"{record.where}: mixes plain text and messages among {', '.join(parts)}, and a row trains either as a "
            "chat or as text; set data.as_chat: true to make the strings turns of a chat"
        )
    if merge_turns:
        row = {k: merge_consecutive(v) if k in turns and isinstance(v, list) else v for k, v in row.items()}
    return row


def _as_chat(record: Record, row: dict, answers: list[str]) -> dict:
    """A plain-text row in the chat format: the prompt a user turn (after the row's `system` text, if it has one),
    each string answer the assistant's reply (also after a prompt given as messages). Rows in the chat format
    already, and text rows, stay as they are."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        system = record.value.get("system")
        if system is not None and not isinstance(system, str):
            raise TunelabError(f"{record.where}: 'system' must be a string, got {type(system).__name__}")
        prompt = [{"role": "system", "content": system}] if system and system.strip() else []
        prompt.append({"role": "user", "content": row["prompt"]})
    elif not isinstance(prompt, list):
        return row
    converted = {k: [{"role": "assistant", "content": row[k]}] for k in answers if isinstance(row.get(k), str)}
    return row | {"prompt": prompt} | converted


ANSWERS = ("completion", "chosen", "rejected")


def _normalise(record: Record, fmt: str) -> dict:
    if not isinstance(record.value, dict):
        raise TunelabError(f"{record.where}: a record must be a JSON object")
    match fmt:
        case "messages":
            messages = _messages(record, record.value.get("messages"), "messages", need_assistant=True)
            return _with_tools({"messages": messages}, row_tools(record))
        case "conversations":
            return _with_tools({"messages": _sharegpt(record)}, row_tools(record))
        case "alpaca":
            return {"messages": _alpaca(record)}
        case "prompt_completion":
            prompt, completion = _field(record, "prompt", (str, list)), _field(record, "completion", (str, list))
            if isinstance(prompt, list):
                prompt = _messages(record, prompt, "prompt", need_assistant=False)
            if isinstance(completion, list):
                completion = _messages(record, completion, "completion", need_assistant=True)
            return _conversation_tools(record, {"prompt": prompt, "completion": completion})
        case "text":
            text = _field(record, "text")
            if not text.strip():
                raise TunelabError(f"{record.where}: 'text' is empty")
            return {"text": text}
        case "prompt":
            return _prompt(record)
        case "preference":
            return _conversation_tools(record, _preference(record))
        case "unpaired":
            return _conversation_tools(record, _unpaired(record))
    raise AssertionError(fmt)


def _prompt(record: Record) -> dict:
    """The shape of the methods that sample their own replies (GRPO, distill): the prompt, and the row's other fields
    as they are (TRL passes them to GRPO's reward functions)."""
    if row_tools(record):
        raise TunelabError(
            f"{record.where}: tool definitions ('tools') on prompts to sample replies for are not read; name the "
            "Python functions a reply may call in grpo.tools (file.py:function), and remove the field"
        )
    prompt = _field(record, "prompt", (str, list))
    if isinstance(prompt, list):
        prompt = _messages(record, prompt, "prompt", need_assistant=False)
        if prompt and prompt[-1]["role"] == "assistant":
            raise TunelabError(
                f"{record.where}: the prompt ends with an assistant turn, and the student samples the next reply; "
                "end it with the user's turn"
            )
    return {k: v for k, v in record.value.items() if k != "system"} | {"prompt": prompt}


def _unpaired(record: Record) -> dict:
    """KTO's shape: one completion and whether it is desirable (TRL's `label`)."""
    label = record.value.get("label")
    if not isinstance(label, bool):
        raise TunelabError(f"{record.where}: 'label' must be true (desirable) or false (undesirable)")
    prompt = _field(record, "prompt", (str, list))
    completion = _response(record, "completion")
    if isinstance(prompt, list):
        prompt = _messages(record, prompt, "prompt", need_assistant=False)
    return {"prompt": prompt, "completion": completion, "label": label}


# ---------------------------------------------------------------- splits


def _check_method(fmt: str, method: str, where: str, first: dict) -> None:
    """Refuse data the method does not train on; `first`: the first record, whose fields may say the renaming that
    makes it data the method takes (a prompt with its answer under another name reads as prompts alone)."""
    from tunelab.methods import REGISTRY

    if fmt in REGISTRY[method].formats:
        return
    takes = [name for name, m in REGISTRY.items() if fmt in m.formats]
    if fmt == "preference":
        held = "preference pairs (chosen/rejected)"
    elif fmt == "unpaired":
        held = "unpaired thumbs-up/down completions (label)"
    elif fmt == "prompt":
        held = "prompts without answers"
    else:
        held = f"{fmt} data"
    wanted = " or ".join(FORMAT_FIELDS[f] for f in REGISTRY[method].formats if f in FORMAT_FIELDS)
    hint = _columns_hint(first) if fmt == "prompt" else ""
    if hint.startswith("data.columns: "):
        raise TunelabError(
            f"{where}: holds {held} but method is {method}; set method: {' or '.join(takes)}, or rename yours "
            f"with {hint}"
        )
    raise TunelabError(
        f"{where}: holds {held} but method is {method}; set method: {' or '.join(takes)}, or give "
        f"{method.upper()} data ({wanted})"
    )


@dataclass
class Loaded:
    """One source, read and normalised."""

    source: DataSource  # as read: its split, subset and columns settled
    format: str
    rows: list[dict]
    origins: list[str]  # where each row comes from
    digest: str  # of the whole source, sampled or not
    available: int  # rows the source holds; more than len(rows) where it asks for a sample


def load_file(source: str | DataSource, key: str, settings: DataSettings, method: str | None, seed: int = 0) -> Loaded:
    """The source's rows, normalised, and what plan and the manifest say of it. `method`: the one the rows must suit;
    None to take them as they are (`tunelab init` picks the method from the format). `key` "data.eval" reads the
    split data.eval_split names from a folder or hub dataset. A source that asks for part of its rows gets a random
    sample of them drawn with `seed` (the digest stays the whole source's)."""
    given = source
    split_key = f"{key}.split" if isinstance(given, DataSource) and given.split else None
    source = settings.settled(given, held_out=held_out_key(key))
    records, digest = read_records(source.path, key, source.split, settings.revision, split_key, source.subset)
    if not records:
        raise TunelabError(f"{source.path}: the dataset is empty")
    available = len(records)
    records = _sampled(records, source, seed, key)
    if source.columns:
        own = isinstance(given, DataSource) and given.columns is not None
        records = _renamed(records, source.columns, source.path, f"{key}.columns" if own else "data.columns")
    from tunelab.methods import REGISTRY

    accepted = REGISTRY[method].formats if method is not None else None
    fmt = settings.format if settings.format != "auto" else detect_format(records[0], accepted)
    if method is not None:
        _check_method(fmt, method, source.path, records[0].value)
    rows = [normalise(r, fmt, settings.merge_consecutive_turns, settings.as_chat) for r in records]
    return Loaded(source, fmt, rows, [r.where for r in records], digest, available)


def _sampled(records: list[Record], source: DataSource, seed: int, key: str) -> list[Record]:
    """The part of `records` the source asks for: the first of them in an order shuffled with `seed`, kept in the
    source's order, so a larger sample of the same source holds every row of a smaller one."""
    size = source.sample_size(len(records))
    if size is None:
        return records
    if size > len(records):
        raise ConfigError(
            f"{key}.rows: {size} asks for more rows than '{source.path}' holds ({len(records):,}); lower it, or "
            "leave it out to take them all"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:size])]


def _renamed(records: list[Record], columns: dict[str, str], source: str, key: str) -> list[Record]:
    """The records with the dataset's fields renamed as `columns` (the setting `key`) says, checked against the first
    record."""
    first = records[0].value if isinstance(records[0].value, dict) else {}
    for old, new in columns.items():
        if old not in first:
            raise ConfigError(f"{key}: '{old}' is not a field of {source} (its fields: {', '.join(sorted(first))})")
        if new in first and new not in columns:
            raise ConfigError(
                f"{key}: {source} has a '{new}' field already, so '{old}' cannot be renamed to it; rename "
                f"'{new}' too, or map '{old}' to another field"
            )
    return [
        Record(r.where, {columns.get(k, k): v for k, v in r.value.items()} if isinstance(r.value, dict) else r.value)
        for r in records
    ]


def load_splits(settings: DataSettings, method: str, seed: int) -> Splits:
    """Read train (and eval) data, each source sampled where it asks for part of its rows; with eval_fraction, hold
    out a seeded random part of train."""
    formats, rows, origins, hashes, parts = {}, [], [], {}, []
    for i, given in enumerate(settings.train if isinstance(settings.train, list) else [settings.train]):
        key = f"data.train[{i}]" if isinstance(settings.train, list) else "data.train"
        loaded = load_file(given, key, settings, method, seed)
        formats[loaded.source.path], hashes[_hash_key(loaded.source, hashes)] = loaded.format, loaded.digest
        rows += loaded.rows
        origins += loaded.origins
        parts.append(loaded)
    names = ", ".join(_part(loaded) for loaded in parts)
    sampled = any(_sampled_part(loaded) for loaded in parts)
    train, evaluation = Split(rows, names, origins, sampled), None
    _check_eval_source(settings)

    def held_out(given: str | DataSource, key: str) -> Split:
        loaded = load_file(given, key, settings, method, seed)
        formats.setdefault(loaded.source.path, loaded.format)
        hashes[_hash_key(loaded.source, hashes)] = loaded.digest
        return Split(loaded.rows, _part(loaded), loaded.origins, _sampled_part(loaded))

    if settings.eval is not None:
        evaluation = held_out(settings.eval, "data.eval")
    elif settings.eval_fraction:
        held, together = _held_out_rows(rows, settings.eval_fraction, seed)
        kept = [i for i in range(len(rows)) if i not in held]
        out = sorted(held)
        train = Split([rows[i] for i in kept], names, [origins[i] for i in kept], sampled)
        how = "held out, a prompt's rows together" if together else "held out"
        evaluation = Split([rows[i] for i in out], f"{names} ({how})", [origins[i] for i in out], sampled)
    also = {name: held_out(given, f"data.eval_also.{name}") for name, given in settings.eval_also.items()}
    return Splits(_one_format(formats, method), train, evaluation, hashes, also)


def _held_out_rows(rows: list[dict], fraction: float, seed: int) -> tuple[set[int], bool]:
    """The rows eval_fraction holds out: whole groups of rows that ask the same (rows of one prompt, copies of a row),
    so no held-out row is asked in training. Groups are taken in an order shuffled with `seed`, each that still fits
    in the fraction, until it is reached; where every row asks something of its own, the draw is the rows' own. Also:
    whether a group had several rows."""
    groups = list(_asked_groups(rows).values())
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ConfigError(f"data.eval_fraction: {fraction} leaves no training examples out of {len(rows)}")
    held: set[int] = set()
    for g in order:
        if len(held) == n_eval:
            break
        if len(held) + len(groups[g]) <= n_eval:
            held.update(groups[g])
    if not held:
        fewest = min(len(g) for g in groups)
        raise ConfigError(
            f"data.eval_fraction: {fraction} of {len(rows)} rows is {n_eval}, and the rows ask {len(groups)} "
            f"prompt{'s' if len(groups) > 1 else ''} with at least {fewest} rows each: whole prompts cannot be held "
            "out within it; raise it, or give held-out data in data.eval"
        )
    return held, len(groups) < len(rows)


def _hash_key(source: DataSource, hashes: dict[str, str]) -> str:
    """The manifest's name for a source's digest: its path, with its subset where it names one, and its split where
    another source of the same path and subset is there already."""
    key = source.path + (f"[{source.subset}]" if source.subset else "")
    return key if key not in hashes else f"{key}:{source.split}"


def _sampled_part(loaded: Loaded) -> bool:
    return len(loaded.rows) < loaded.available


def _part(loaded: Loaded) -> str:
    """A source as plan names it: its path, and the sample taken where it took one."""
    if not _sampled_part(loaded):
        return loaded.source.path
    return f"{loaded.source.path} ({len(loaded.rows):,} of {loaded.available:,} rows, sampled)"


def _one_format(formats: dict[str, str], method: str) -> str:
    """The format the splits hold, as plan shows it ("messages+alpaca" for SFT from files of several shapes: tunelab
    tokenizes each row as its shape says). A preference method's trainer takes one shape, so its files must agree."""
    kinds = list(dict.fromkeys(formats.values()))
    if len(kinds) > 1 and method != "sft":
        (a, fmt_a), *_ = formats.items()
        b, fmt_b = next((source, f) for source, f in formats.items() if f != fmt_a)
        raise ConfigError(
            f"data: '{a}' holds {fmt_a} rows ({FORMAT_FIELDS[fmt_a]}) and '{b}' {fmt_b} rows "
            f"({FORMAT_FIELDS[fmt_b]}); {method} trains on one kind: convert one, or train them in separate runs"
        )
    return "+".join(kinds)


def _check_eval_source(settings: DataSettings) -> None:
    """A split needs a folder or hub dataset to read. Held-out data that is the training data measures memorisation,
    not learning: the same file, or the same split of a folder or hub dataset, is refused."""
    if settings.eval_split and (not settings.eval or Path(settings.eval_source.path).is_file()):
        raise ConfigError(
            "data.eval_split: names a split of data.eval, which "
            + (f"is a file ('{settings.eval_source.path}') and has no splits" if settings.eval else "is not set")
            + "; remove it, or point data.eval at a folder or hub dataset"
        )
    given = settings.train if isinstance(settings.train, list) else [settings.train]
    keys = [f"data.train[{i}]" for i in range(len(given))] if isinstance(settings.train, list) else ["data.train"]
    for key, source in zip([*keys, "data.eval"], [*given, settings.eval], strict=True):
        if isinstance(source, DataSource) and source.split and Path(source.path).is_file():
            raise ConfigError(f"{key}.split: '{source.path}' is a file and has no splits; remove split")
    held = [("data.eval", settings.eval_source)] if settings.eval is not None else []
    held += [(f"data.eval_also.{name}", settings.settled(s, held_out=True)) for name, s in settings.eval_also.items()]
    for key, held_out in held:
        for source in settings.train_sources:
            if Path(source.path).resolve() != Path(held_out.path).resolve():
                continue
            if Path(held_out.path).is_file():
                raise ConfigError(
                    f"{key}: '{held_out.path}' is also a training file, so eval loss would measure memorisation; "
                    "give a held-out file, or use data.eval_fraction to hold out part of it"
                )
            if held_out.split == source.split and held_out.subset == source.subset:
                raise ConfigError(
                    f"{key}: reads the same split of '{held_out.path}' as data.train ('{source.split}'), so eval "
                    "loss would measure memorisation; set data.eval_split to its held-out split, or use "
                    "data.eval_fraction"
                )


# ---------------------------------------------------------------- overlap


def _key(value: Any) -> bytes:
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=_stable)
    return hashlib.blake2b(blob.encode(), digest_size=16).digest()


def prompt_of(row: dict) -> Any | None:
    """What a normalised row asks: its prompt, or a chat's turns before its last reply, with the tools it offers;
    None for plain text, which asks nothing."""
    if "prompt" in row:
        asked = row["prompt"]
    else:
        messages = row.get("messages") or []
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        asked = messages[: replies[-1]] if replies else None
    if not asked:
        return None
    return [row["tools"], asked] if row.get("tools") else asked


def _asked(row: dict) -> tuple[str, bytes]:
    """The key of what a row asks: its prompt's, or (plain text) the row's own."""
    asked = prompt_of(row)
    return ("prompt", _key(asked)) if asked is not None else ("row", _key(row))


def _asked_groups(rows: list[dict]) -> dict[tuple[str, bytes], list[int]]:
    """The rows' indices by what they ask, in order of first appearance."""
    groups: dict[tuple[str, bytes], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(_asked(row), []).append(i)
    return groups


@dataclass
class Seen:
    """Held-out rows a training set holds, each as (held-out origin, training origin): `same`, the same rows;
    `asked`, others that ask what a training row asks."""

    held: int  # the held-out rows looked at
    same: list[tuple[str, str]]
    asked: list[tuple[str, str]]

    @property
    def count(self) -> int:
        return len(self.same) + len(self.asked)

    def said(self) -> str | None:
        """How many held-out rows are training rows, and how many others ask what one asks, with the first of each."""
        parts = []
        if self.same:
            (a, b), n = self.same[0], len(self.same)
            parts.append(f"{n:,} of {self.held:,} held-out rows are training rows too (first: {a} is {b})")
        if self.asked:
            (c, d), which = self.asked[0], "more" if self.same else f"of {self.held:,} held-out rows"
            parts.append(f"{len(self.asked):,} {which} ask what a training row asks (first: {c} asks what {d} does)")
        return ", and ".join(parts) or None


@dataclass
class TrainingRows:
    """A training split's rows by content and by what they ask (the first origin of each), and the rows that repeat
    an earlier one. Rows are compared as normalised, character for character."""

    rows: dict[bytes, str]
    asked: dict[tuple[str, bytes], str]
    repeats: list[tuple[str, str]]  # (origin, the earlier row's origin)

    @classmethod
    def of(cls, train: Split) -> TrainingRows:
        index = cls({}, {}, [])
        for row, origin in zip(train.rows, train.origins, strict=True):
            key = _key(row)
            if key in index.rows:
                index.repeats.append((origin, index.rows[key]))
            index.rows.setdefault(key, origin)
            index.asked.setdefault(_asked(row), origin)
        return index

    def seen(self, held: Split) -> Seen:
        same, asked = [], []
        for row, origin in zip(held.rows, held.origins, strict=True):
            if (twin := self.rows.get(_key(row))) is not None:
                same.append((origin, twin))
            elif (twin := self.asked.get(_asked(row))) is not None:
                asked.append((origin, twin))
        return Seen(len(held.rows), same, asked)


def overlap_warnings(splits: Splits) -> list[str]:
    """What plan says of rows that are not what they seem: training rows that repeat another (each copy trains
    again), and held-out rows that are training rows or ask a training row's prompt (their numbers then measure
    recall of the training data)."""
    index, warnings = TrainingRows.of(splits.train), []
    if index.repeats:
        (a, b), n = index.repeats[0], len(index.repeats)
        warnings.append(
            f"data.train: {n:,} of {len(splits.train.rows):,} rows repeat an earlier training row (first: {a} repeats "
            f"{b}); each copy trains again, so remove the copies unless the repeat is meant"
        )
    held_out = [("data.eval", splits.eval)] if splits.eval is not None else []
    for key, split in [*held_out, *((f"data.eval_also.{name}", s) for name, s in splits.also.items())]:
        if said := index.seen(split).said():
            warnings.append(
                f"{key}: {said}; what is measured on them is partly recall of the training data: remove them from "
                "one side"
            )
    return warnings


def rendered(rows: list[dict]) -> str:
    """How training renders these (normalised) rows' prompts: "chat" where any row is a conversation, through the
    chat template; "text" where every row is plain text (string prompts and answers, or raw text)."""
    for row in rows:
        sft = as_sft_row(row)
        if "messages" in sft or isinstance(sft.get("prompt"), list) or isinstance(sft.get("completion"), list):
            return "chat"
    return "text"


def as_sft_row(row: dict, fmt: str | None = None) -> dict:
    """Preference pairs are measured (and their tokens checked) as their prompt followed by the chosen answer, GRPO's
    prompts (format "prompt") as the prompt and an empty reply: their length, and the reply's opening and
    terminator that sampling starts from and stops at."""
    if fmt == "prompt":  # with the tools GRPO's replies may call (grpo.tools), which the template prints
        prompt = row["prompt"]
        completion = [{"role": "assistant", "content": ""}] if isinstance(prompt, list) else ""
        return _with_tools({"prompt": prompt, "completion": completion}, row.get("tools"))
    if "chosen" not in row:
        return row
    prompt, chosen = row.get("prompt", []), row["chosen"]
    if isinstance(chosen, list):
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    elif isinstance(prompt, list):
        chosen = [{"role": "assistant", "content": chosen}]
    return _with_tools({"prompt": prompt, "completion": chosen}, row.get("tools"))
