"""Each input is read once per command: `tunelab train` plans and trains over the same reads.

A fresh process counts its own file opens with an audit hook (sys.addaudithook's "open" event), as a user's
`tunelab train` runs; the tokenizer's files are compared with what one tokenizer load opens.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA, EXAMPLES, REPO

pytestmark = pytest.mark.slow

COUNT = """
import collections, json, os, sys
counts = collections.Counter()
def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
    if "w" in mode or "a" in mode or "x" in mode:
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    # PEFT re-reads the base's config.json inside save_pretrained to compare vocabulary sizes: its read, not ours.
    frame = sys._getframe(1)
    while frame is not None:
        if "peft/utils/save_and_load" in frame.f_code.co_filename:
            return
        frame = frame.f_back
    counts[path] += 1
sys.addaudithook(hook)
{body}
json.dump(counts, open(sys.argv[1], "w"))
"""

TRAIN = """
from tunelab.cli import app
try:
    app(sys.argv[2:])
except SystemExit as e:
    assert e.code in (0, None), e.code
"""

TOKENIZER = """
from tunelab.config import load_experiment
from tunelab.models import load_tokenizer
exp = load_experiment(sys.argv[2])
load_tokenizer(exp.tokenizer, exp.model)
"""


def opened(body: str, out: Path, *args: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", COUNT.replace("{body}", body), str(out), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_reads_data_tokenizer_and_config_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    experiment = str(EXAMPLES / "quickstart.yaml")
    args = ["train", experiment, "--set", f"output.dir={tmp_path}", "--set", "train.max_steps=1"]
    counts = opened(TRAIN, tmp_path / "train.json", *args)
    one_load = opened(TOKENIZER, tmp_path / "tokenizer.json", experiment)
    model = str(tiny_model_dir.resolve())

    for data in ("sft_train.jsonl", "sft_eval.jsonl"):
        assert counts[str((DATA / data).resolve())] == 1, data
    assert counts[str((EXAMPLES / "quickstart.yaml").resolve())] == 1
    tokenizer_files = {p: n for p, n in one_load.items() if p.startswith(model) and not p.endswith("/config.json")}
    assert tokenizer_files  # the measurement saw the tokenizer's own files
    for path, n in tokenizer_files.items():
        assert counts[path] == n, path
    # The model's config.json: loaded once for plan and training, hashed once for the base's fingerprint.
    assert counts[f"{model}/config.json"] == 2
