"""Two CPU processes (torchrun, gloo) train one model: identical weights on both ranks, equal to the saved ones."""

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli, run_cli_killed_after_save
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


def test_two_process_resume_after_sigkill(tmp_path: Path, tiny_model_dir) -> None:
    args = [
        "--nproc",
        "2",
        "--set",
        f"output.dir={tmp_path}",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_steps=3",
        "--set",
        "train.logging_steps=1",
    ]
    straight = run_cli("train", str(EXAMPLES / "lora-qv.yaml"), "--name", "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli_killed_after_save(3, "train", str(EXAMPLES / "lora-qv.yaml"), "--name", "crashed", *args)
    assert killed.returncode != 0
    resumed = run_cli("train", str(EXAMPLES / "lora-qv.yaml"), "--name", "crashed", "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("straight", "crashed"))
    assert a["distributed"]["rank_digests"] == b["distributed"]["rank_digests"]
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        for n in ("straight", "crashed")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6
