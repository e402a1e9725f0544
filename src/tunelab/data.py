"""Read datasets, detect their format, validate every record and normalise it.

Normalised rows are what TRL expects: `{"messages": [...]}` for chats (ShareGPT and Alpaca are
converted), `{"prompt", "completion"}`, `{"text"}`, or `{"prompt", "chosen", "rejected"}` for
preference pairs. Every error names the file and the line (or record number).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import DataSettings
from tunelab.errors import ConfigError, TunelabError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SFT_FORMATS = ("messages", "conversations", "prompt_completion", "text", "alpaca")
FORMAT_FIELDS = {
    "preference": "chosen/rejected",
    "messages": "messages",
    "conversations": "conversations",
    "prompt_completion": "prompt/completion",
    "alpaca": "instruction/output",
    "text": "text",
}


@dataclass
class Record:
    where: str  # "file:line" or "file#record"
    value: Any


@dataclass
class Split:
    rows: list[dict]
    source: str


@dataclass
class Splits:
    format: str
    train: Split
    eval: Split | None


# ---------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(Record(f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise TunelabError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from e
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TunelabError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    return [Record(f"{path}#{i + 1}", r) for i, r in enumerate(data)]


def _read_csv(path: Path) -> list[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        # Line 1 is the header, so record i sits on line i + 2 (for records without embedded newlines).
        return [Record(f"{path}:{i + 2}", dict(r)) for i, r in enumerate(csv.DictReader(f))]


def _read_with_datasets(source: str, split: str) -> list[Record]:
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        else:
            ds = datasets.load_dataset(source, split=split)
    except (OSError, ValueError, KeyError, FileNotFoundError) as e:
        raise TunelabError(f"{source}: cannot load dataset ({str(e).splitlines()[0]})") from e
    return [Record(f"{source}#{i + 1}", r) for i, r in enumerate(ds)]


def read_records(source: str, key: str, hub_split: str = "train") -> list[Record]:
    path = Path(source)
    if path.is_file():
        match path.suffix.lower():
            case ".jsonl":
                return _read_jsonl(path)
            case ".json":
                return _read_json(path)
            case ".csv":
                return _read_csv(path)
            case ".parquet":
                return _read_with_datasets(source, hub_split)
        raise TunelabError(f"{source}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")
    if path.is_dir():
        return _read_with_datasets(source, hub_split)
    looks_like_file = path.suffix != "" or source.startswith(("/", ".", "~"))
    if looks_like_file or source.count("/") != 1:
        raise ConfigError(f"{key}: data file '{source}' not found")
    return _read_with_datasets(source, hub_split)


# ---------------------------------------------------------------- formats


def detect_format(record: Record) -> str:
    value = record.value
    if not isinstance(value, dict):
        raise TunelabError(f"{record.where}: a record must be a JSON object, got {type(value).__name__}")
    keys = set(value)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    for fmt, needed in (
        ("messages", {"messages"}),
        ("conversations", {"conversations"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("alpaca", {"instruction", "output"}),
        ("text", {"text"}),
    ):
        if needed <= keys:
            return fmt
    raise TunelabError(
        f"{record.where}: cannot tell the data format from fields {sorted(keys)}; expected one of: "
        + ", ".join(FORMAT_FIELDS.values())
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
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TunelabError(f"{record.where}: {name}[{i}] must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TunelabError(
                f"{record.where}: {name}[{i}] has unknown role '{m['role']}'; roles are {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise TunelabError(f"{record.where}: {name}[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise TunelabError(f"{record.where}: '{name}' has no assistant message, so nothing would be learned")
    return out


def _sharegpt(record: Record) -> list[dict]:
    turns = _field(record, "conversations", (list,))
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise TunelabError(f"{record.where}: conversations[{i}] must have 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise TunelabError(
                f"{record.where}: conversations[{i}] has unknown role '{t['from']}'; roles are "
                + ", ".join(SHAREGPT_ROLES)
            )
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _messages(record, messages, "conversations", need_assistant=True)


def _alpaca(record: Record) -> list[dict]:
    instruction = _field(record, "instruction")
    extra = record.value.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _field(record, "output")}]


def _response(record: Record, name: str) -> str | list[dict]:
    value = _field(record, name, (str, list))
    if isinstance(value, list):
        value = _messages(record, value, name, need_assistant=False)
        if not any(m["content"].strip() for m in value if m["role"] == "assistant"):
            raise TunelabError(f"{record.where}: '{name}' has an empty response")
    elif not value.strip():
        raise TunelabError(f"{record.where}: '{name}' is empty")
    return value


def _preference(record: Record) -> dict:
    chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    if chosen == rejected:
        raise TunelabError(f"{record.where}: chosen and rejected are identical, so the pair teaches nothing")
    if "prompt" in record.value:
        prompt = _field(record, "prompt", (str, list))
        if isinstance(prompt, list):
            prompt = _messages(record, prompt, "prompt", need_assistant=False)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise TunelabError(
            f"{record.where}: record has no 'prompt' field (an implicit prompt needs chosen and "
            "rejected as message lists that share the conversation prefix)"
        )
    # Implicit prompt: the shared conversation prefix is the prompt, the rest are the two answers.
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise TunelabError(
            f"{record.where}: chosen and rejected share no conversation prefix to use as the prompt; "
            "add a 'prompt' field"
        )
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def normalise(record: Record, fmt: str) -> dict:
    if not isinstance(record.value, dict):
        raise TunelabError(f"{record.where}: a record must be a JSON object")
    match fmt:
        case "messages":
            return {"messages": _messages(record, record.value.get("messages"), "messages", need_assistant=True)}
        case "conversations":
            return {"messages": _sharegpt(record)}
        case "alpaca":
            return {"messages": _alpaca(record)}
        case "prompt_completion":
            prompt, completion = _field(record, "prompt", (str, list)), _field(record, "completion", (str, list))
            if isinstance(prompt, list) != isinstance(completion, list):
                raise TunelabError(f"{record.where}: prompt and completion must both be strings or both message lists")
            if isinstance(prompt, list):
                prompt = _messages(record, prompt, "prompt", need_assistant=False)
                completion = _messages(record, completion, "completion", need_assistant=True)
            return {"prompt": prompt, "completion": completion}
        case "text":
            text = _field(record, "text")
            if not text.strip():
                raise TunelabError(f"{record.where}: 'text' is empty")
            return {"text": text}
        case "preference":
            return _preference(record)
    raise AssertionError(fmt)


# ---------------------------------------------------------------- splits


def _check_method(fmt: str, method: str, where: str) -> None:
    if method == "sft" and fmt == "preference":
        raise TunelabError(
            f"{where}: holds preference pairs (chosen/rejected) but method is sft; "
            "set method: dpo, or give SFT data (messages, prompt/completion, text)"
        )
    if method == "dpo" and fmt != "preference":
        raise TunelabError(
            f"{where}: holds {fmt} data but method is dpo; DPO needs prompt/chosen/rejected preference pairs"
        )


def load_file(
    source: str, key: str, settings: DataSettings, method: str, fmt: str | None = None
) -> tuple[str, list[dict]]:
    records = read_records(source, key, settings.hub_split)
    if not records:
        raise TunelabError(f"{source}: the dataset is empty")
    fmt = fmt or (settings.format if settings.format != "auto" else detect_format(records[0]))
    _check_method(fmt, method, source)
    return fmt, [normalise(r, fmt) for r in records]


def load_splits(settings: DataSettings, method: str, seed: int) -> Splits:
    """Read train (and eval) data; with eval_fraction, hold out a seeded random part of train."""
    fmt, rows = None, []
    for source in settings.train_files:
        fmt, file_rows = load_file(source, "data.train", settings, method, fmt)
        rows += file_rows
    assert fmt is not None
    sources = ", ".join(settings.train_files)
    train, evaluation = Split(rows, sources), None
    if settings.eval:
        _, eval_rows = load_file(settings.eval, "data.eval", settings, method, fmt)
        evaluation = Split(eval_rows, settings.eval)
    elif settings.eval_fraction:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * settings.eval_fraction))
        if n_eval >= len(rows):
            raise ConfigError(
                f"data.eval_fraction: {settings.eval_fraction} leaves no training examples out of {len(rows)}"
            )
        held = set(order[:n_eval])
        train = Split([r for i, r in enumerate(rows) if i not in held], sources)
        evaluation = Split([r for i, r in enumerate(rows) if i in held], f"{sources} (held out)")
    return Splits(fmt, train, evaluation)


def file_hashes(settings: DataSettings) -> dict[str, str]:
    import hashlib

    hashes = {}
    for source in [*settings.train_files, *([settings.eval] if settings.eval else [])]:
        path = Path(source)
        if path.is_file():
            hashes[source] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        else:
            hashes[source] = "hub-or-folder"
    return hashes
