"""Read a W&B offline run's records (`<dir>/wandb/offline-run-*/run-*.wandb`), the file `wandb sync` uploads.

wandb no longer ships a Python reader for it (its core is in Go); the format is the LevelDB log format (32 KiB blocks
of records with a 7-byte header: CRC32, length, type) after a 7-byte file header (":W&B", magic 0xBEE1, version 0),
each record a `wandb.proto.wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    out, pending, at = [], b"", 7
    while at + 7 <= len(data):
        left = BLOCK - at % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            at += left
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        if kind == 0 and length == 0:
            at += left
            continue
        chunk = data[at + 7 : at + 7 + length]
        at += 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _items(items) -> dict:
    return {_key(item): json.loads(item.value_json) for item in items}


def offline_run(run_dir: Path) -> dict:
    """The group, config, logged history and summary of the one offline W&B run under `run_dir`."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = {"group": None, "name": None, "config": {}, "history": [], "summary": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["name"] = record.run.run_group, record.run.display_name
            run["config"] |= _items(record.run.config.update)
        elif kind == "config":
            run["config"] |= _items(record.config.update)
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"] |= _items(record.summary.update)
    return run
