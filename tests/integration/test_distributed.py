"""Two CPU processes (gloo) train one model: identical weights on both ranks, equal to the saved ones, and the
same weights whether torchrun (--nproc) or accelerate launch (distributed.accelerate_config) started them."""

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, relative_distance, run_cli, straight_and_killed, trained_tensors
from tunelab.config import load_experiment
from tunelab.distributed import trained_digest
from tunelab.runs import read_manifest, read_metrics
from tunelab.scopes import load_trained
from tunelab.train import train

pytestmark = pytest.mark.slow


# 2 processes x 4 examples: the same 8 examples a step as one process with batch_size 8 (no dropout, whose
# random draws differ per process).
SHORT = [
    "--set",
    "train.max_steps=4",
    "--set",
    "train.logging_steps=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "scope.lora.dropout=0.0",
]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_model_dir) -> Path:
    out_dir = tmp_path_factory.mktemp("torchrun")
    # A checkpoint after every step (train.save_minutes): the processes must agree on each one.
    timed = ["--set", "train.save_minutes=1e-9", "--set", "train.save_total_limit=10"]
    out = run_cli(
        "train", str(EXAMPLES / "lora-qv.yaml"), "--nproc", "2", "--set", f"output.dir={out_dir}", *SHORT, *timed
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out_dir


def test_two_process_training_keeps_ranks_identical(torchrun_run: Path) -> None:
    tmp_path = torchrun_run
    manifest = read_manifest(tmp_path / "lora-qv")
    assert manifest.status == "completed"
    assert manifest.distributed.engine == "MULTI_CPU"
    digests = manifest.distributed.rank_digests
    assert manifest.distributed.world_size == 2 and len(digests) == 2 and digests[0] == digests[1]
    model = load_trained(tmp_path / "lora-qv")
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert trained_digest(model, names) == digests[0]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "lora-qv" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps == [1, 2, 3, 4]  # one process writes; steps are global
    saved = sorted(p.name for p in (tmp_path / "lora-qv" / "checkpoints").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{step}" for step in steps]


def test_two_processes_train_what_one_process_trains_on_the_whole_batch(tmp_path: Path, torchrun_run: Path) -> None:
    exp = load_experiment(
        EXAMPLES / "lora-qv.yaml",
        [
            f"output.dir={tmp_path}",
            "train.max_steps=4",
            "train.logging_steps=1",
            "train.batch_size=8",
            "scope.lora.dropout=0.0",
        ],
    )
    single = train(exp).run_dir
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (single, torchrun_run / "lora-qv")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert relative_distance(trained_tensors(torchrun_run / "lora-qv"), trained_tensors(single)) < 1e-5


def test_accelerate_config_launch_trains_the_same_weights(tmp_path: Path, torchrun_run: Path) -> None:
    # No --nproc: the experiment's accelerate config (MULTI_GPU, 2 processes) decides; on CPU it runs gloo DDP.
    out = run_cli(
        "train",
        str(EXAMPLES / "lora-qv.yaml"),
        "--set",
        "distributed.accelerate_config=accelerate/ddp.yaml",
        "--set",
        f"output.dir={tmp_path}",
        *SHORT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    via_accelerate = json.loads((tmp_path / "lora-qv" / "manifest.json").read_text())["distributed"]
    via_torchrun = json.loads((torchrun_run / "lora-qv" / "manifest.json").read_text())["distributed"]
    assert via_accelerate["world_size"] == 2 and via_accelerate["engine"] == "MULTI_CPU"
    assert via_accelerate["accelerate_config"] == str(EXAMPLES / "accelerate" / "ddp.yaml")
    assert via_accelerate["rank_digests"] == via_torchrun["rank_digests"]


def test_fsdp_on_cpu_is_refused_before_launch(tmp_path: Path) -> None:
    out = run_cli(
        "train",
        str(EXAMPLES / "lora-qv.yaml"),
        "--set",
        "distributed.accelerate_config=accelerate/fsdp.yaml",
        "--set",
        f"output.dir={tmp_path}",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {EXAMPLES / 'lora-qv.yaml'}: distributed.accelerate_config: 'fsdp.yaml' asks for FSDP, which "
        "accelerate runs on GPUs only (on cpu it would silently train unsharded); remove the distributed section "
        "for this device, or run on GPUs"
    ]
    assert not (tmp_path / "lora-qv").exists()


def test_two_process_resume_after_sigkill(tmp_path: Path, tiny_model_dir) -> None:
    steps = ["--set", "train.max_steps=6", "--set", "train.save_steps=3", "--set", "train.logging_steps=1"]
    crashed, killed = straight_and_killed("lora-qv", 3, tmp_path, "--nproc", "2", *steps)
    assert killed != 0  # the launcher's exit code, not the killed process's
    alone = run_cli(*crashed[:-2], "--resume")  # without --nproc 2: one process, half the examples a step
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr[-2000:]
    assert "the number of processes changed (2 -> 1): each takes train.batch_size examples a step" in alone.stderr
    assert "resume it with 2 processes; resuming would mix two experiments" in alone.stderr
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-3" in resumed.stdout  # a resume, not a restart that happens to agree
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


def test_eva_in_two_processes_starts_as_one_process_does(tmp_path: Path) -> None:
    """init: eva under DDP: each process reads all the training batches and computes the start. After one step A is
    still the start (its gradient is zero while B is), the same in both processes and the same as one process's with
    the same batches."""
    sets = ["train.max_steps=1", "train.batch_size=4", "scope.lora.dropout=0.0", "scope.lora.init=eva"]
    out = run_cli(
        "train", str(EXAMPLES / "lora-qv.yaml"), "--nproc", "2", "--set", f"output.dir={tmp_path / 'two'}",
        *[arg for s in sets for arg in ("--set", s)],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "initialising the adapter from its layers' inputs on the training batches (EVA)" in out.stdout
    digests = read_manifest(tmp_path / "two" / "lora-qv").distributed.rank_digests
    assert len(digests) == 2 and digests[0] == digests[1]
    single = train(load_experiment(EXAMPLES / "lora-qv.yaml", [f"output.dir={tmp_path / 'one'}", *sets])).run_dir
    one, two = trained_tensors(single), trained_tensors(tmp_path / "two" / "lora-qv")
    starts = [n for n in one if ".lora_A." in n]
    assert len(starts) == 2 * 4
    assert relative_distance({n: two[n] for n in starts}, {n: one[n] for n in starts}) < 1e-5
