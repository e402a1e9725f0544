"""Shared fixtures. The built-in model is built once per machine into .tunelab-cache/ (about 45 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "data"
CONFIGS = Path(__file__).parent / "fixtures" / "configs"
os.environ.setdefault("TUNELAB_HOME", str(REPO / ".tunelab-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunelab.builtin import materialise

    return materialise("tiny-chat")


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `tunelab ...` in a fresh process, as a user would; `env` adds environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def straight_and_killed(example: str, kill_after: int, out: Path, *args: str) -> tuple[list[str], int]:
    """Train an example twice into `out`: "straight" to the end, and "crashed" killed with SIGKILL right after
    checkpoint `kill_after`. Returns the arguments that rerun "crashed", and its exit code."""
    command = ["train", str(EXAMPLES / f"{example}.yaml"), "--set", f"output.dir={out}", *args]
    straight = run_cli(*command, "--name", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # tunelab's test hook: the process kills itself, as a crash would, right after that checkpoint
    killed = run_cli(*command, "--name", "crashed", env={"TUNELAB_TEST_SIGKILL_AFTER_SAVE": str(kill_after)})
    return [*command, "--name", "crashed"], killed.returncode


def resume_matches_straight(example: str, out: Path, *args: str) -> None:
    """Kill a 6-step run of `example` right after checkpoint 3, resume it, and check it ends with exactly the
    uninterrupted run's trained weights and losses."""
    import torch

    from tunelab.runs import read_manifest, read_metrics

    steps = ["--set", "train.max_steps=6", "--set", "train.save_steps=3", "--set", "train.logging_steps=1", *args]
    crashed, killed = straight_and_killed(example, 3, out, *steps)
    assert killed == -9 and read_manifest(out / "crashed").status == "running"
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-3" in resumed.stdout  # a resume, not a restart that happens to agree
    a, b = trained_tensors(out / "straight"), trained_tensors(out / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(out / n) if "loss" in r] for n in ("straight", "crashed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert read_manifest(out / "crashed").global_steps == 6


def write_experiment(folder: Path, text: str, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def trained_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tunelab.runs import read_manifest

    manifest = read_manifest(run_dir)
    name = "adapter/adapter_model.safetensors" if manifest.result == "adapter" else manifest.result
    return load_file(str(run_dir / name))


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all tensors together."""
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5
    return diff / sum(float(t.norm() ** 2) for t in b.values()) ** 0.5
