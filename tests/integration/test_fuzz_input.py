"""Generated bad experiment files and data rows through the CLI: exit 2, one line, no traceback, nothing written."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA
from tunelab import cli

pytestmark = pytest.mark.slow
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
KEYS = [
    "train.learning_rate",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.micro_batch_size",
    "train.max_length",
    "train.warmup",
    "train.seed",
    "train.optimizer",
    "train.report_to",
    "train.scheduler",
    "train.padding_free",
    "scope.lora.r",
    "scope.lora.alpha",
    "scope.lora.dropout",
    "scope.lora.targets",
    "scope.lora.layers",
    "scope.partial.last_blocks",
    "data.eval_fraction",
    "data.format",
    "model.dtype",
    "model.device",
    "tokenizer.chat_template",
    "tokenizer.pad_token",
    "output.name",
    "method",
    "name",
]
BAD_VALUES = [
    -1,
    0,
    10**30,
    float("inf"),
    float("nan"),
    "",
    "nonsense",
    "../../etc",
    [],
    {},
    [None],
    {"a": 1},
    True,
    "[red]x[/]",
    "\u00e9\u0000",
]
BAD_ROWS = [
    [],
    "text",
    42,
    None,
    {},
    {"messages": []},
    {"messages": "hi"},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 7}]},
    {"conversations": [{"from": "alien", "value": "x"}]},
    {"prompt": "x", "completion": ["y"]},
    {"prompt": ["x"], "completion": "y"},
    {"text": ""},
    {"text": None},
    {"instruction": 3, "output": "y"},
]


def cli_run(capsys, *args: str) -> tuple[int, str]:
    """The CLI's own entry point in this process (the same handling as a shell run, without the start-up)."""
    argv = sys.argv
    sys.argv = ["tunelab", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # what a shell user would see as a traceback
        return -1, f"Traceback: {type(e).__name__}: {e}"
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def write(folder: Path, raw: dict, name: str) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def base(out: Path, train: Path | str = DATA / "sft_train.jsonl") -> dict:
    return {
        "name": "f",
        "model": {"id": "builtin:tiny-chat"},
        "data": {"train": str(train)},
        "output": {"dir": str(out)},
    }


def test_generated_bad_experiments_are_one_line_errors(tmp_path: Path, capsys, tiny_model_dir) -> None:
    rng = random.Random(0)
    out = tmp_path / "runs"
    cases = [(key, value) for key in KEYS for value in rng.sample(BAD_VALUES, 4)]
    failures = []
    for i, (key, value) in enumerate(cases):
        raw = base(out)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        code, err = cli_run(capsys, "plan", str(write(tmp_path, raw, f"e{i}.yaml")))
        if code == 0:
            continue  # some values are valid for some keys (e.g. 0 warmup, True for a bool)
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err:
            failures.append((key, value, code, err[-300:]))
    assert failures == []
    assert not out.exists()


def test_generated_bad_data_rows_are_one_line_errors_and_leave_nothing(tmp_path: Path, capsys, tiny_model_dir) -> None:
    out = tmp_path / "runs"
    failures = []
    for i, row in enumerate(BAD_ROWS):
        data = tmp_path / f"d{i}.jsonl"
        data.write_text((json.dumps(GOOD_ROW) + "\n") * 3 + json.dumps(row) + "\n")
        experiment = write(tmp_path, base(out, data), f"d{i}.yaml")
        for command in ("plan", "train"):
            code, err = cli_run(capsys, command, str(experiment))
            lines = err.strip().splitlines()
            ok = code == 2 and len(lines) == 1 and f"d{i}.jsonl:4" in lines[0] and "Traceback" not in err
            if not ok:
                failures.append((command, row, code, err[-300:]))
    assert failures == []
    assert not out.exists() or not any(out.iterdir())


def test_a_broken_template_and_a_refused_loss_type_are_one_line(tmp_path: Path, capsys, tiny_model_dir) -> None:
    out = tmp_path / "runs"
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m.content }")
    raw = base(out) | {"tokenizer": {"chat_template": str(template)}}
    code, err = cli_run(capsys, "plan", str(write(tmp_path, raw, "t.yaml")))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "chat template" in err
    raw = base(out, DATA / "pref_train.jsonl") | {"method": "dpo", "dpo": {"loss_type": "no-such-loss"}}
    raw["train"] = {"max_steps": 1}
    code, err = cli_run(capsys, "train", str(write(tmp_path, raw, "d.yaml")))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no-such-loss" in err
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
