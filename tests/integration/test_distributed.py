"""Two CPU processes (torchrun, gloo) train one model: identical weights on both ranks, equal to the saved ones."""

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli
from tunelab.distributed import trained_digest
from tunelab.models import load_trained

pytestmark = pytest.mark.slow


def test_two_process_training_keeps_ranks_identical(tmp_path: Path, tiny_model_dir) -> None:
    out = run_cli(
        "train",
        str(EXAMPLES / "lora-qv.yaml"),
        "--nproc",
        "2",
        "--set",
        f"output.dir={tmp_path}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.logging_steps=1",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "lora-qv" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    digests = manifest["distributed"]["rank_digests"]
    assert manifest["distributed"]["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    model = load_trained(tmp_path / "lora-qv")
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert trained_digest(model, names) == digests[0]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "lora-qv" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3, 4]  # one process writes; steps are global
