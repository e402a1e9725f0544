"""`train.compile`: the run goes through torch.compile (Inductor builds its kernels) and trains the same steps as
without it; where no compiler can build kernels, the setting is refused in one line before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli

pytestmark = pytest.mark.slow


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def kernels(folder: Path) -> list[Path]:
    """What Inductor wrote: the generated kernel sources and their compiled libraries."""
    return [p for p in folder.rglob("*") if p.suffix in (".py", ".so", ".cpp")] if folder.is_dir() else []


def test_a_compiled_run_builds_kernels_and_trains_the_eager_runs_steps(tmp_path: Path) -> None:
    quickstart = EXAMPLES / "quickstart.yaml"
    common = ["--set", f"output.dir={tmp_path}", "--set", "train.max_steps=2", "--set", "train.logging_steps=1"]
    common += ["--set", "data.eval=null"]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "CXX": None}
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):  # then the refusal is what there is to see
        refused = run_cli("train", str(quickstart), *common, "--set", "train.compile=true", env=env)
        assert (
            refused.returncode == 2 and "train.compile: torch.compile builds CPU kernels with a C++" in refused.stderr
        )
        return
    eager = run_cli("train", str(quickstart), *common, "--name", "eager", env=env)
    assert eager.returncode == 0, eager.stderr[-3000:]
    assert kernels(tmp_path / "inductor") == []
    compiled = run_cli("train", str(quickstart), *common, "--set", "train.compile=true", "--name", "compiled", env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert kernels(tmp_path / "inductor")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    assert len(losses(tmp_path / "eager")) == 2


def test_compile_without_a_compiler_is_refused_before_anything_loads(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    done = run_cli(
        "plan",
        str(EXAMPLES / "quickstart.yaml"),
        "--set",
        "train.compile=true",
        env={"PATH": str(tmp_path / "bin"), "CXX": None},
    )
    assert done.returncode == 2 and done.stderr == (
        f"error: {EXAMPLES / 'quickstart.yaml'}: train.compile: torch.compile builds CPU kernels with a C++ "
        "compiler, and none is on PATH (g++, c++ or clang++); install one, or set train.compile: false\n"
    )


def test_a_compiler_that_fails_mid_run_is_one_line_and_a_failed_run(tmp_path: Path) -> None:
    """A C++ compiler that exists but does not work gets past the check and fails inside Inductor at the first step:
    one line naming train.compile, and a run recorded as failed with it."""
    quickstart = EXAMPLES / "quickstart.yaml"
    done = run_cli(
        "train",
        str(quickstart),
        *("--set", f"output.dir={tmp_path}", "--set", "train.max_steps=1", "--set", "data.eval=null"),
        *("--set", "train.compile=true", "--name", "broken"),
        env={"CXX": shutil.which("false") or "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")},
    )
    said = f"error: {quickstart}: train.compile: torch.compile failed on this model (InductorError: "
    assert done.returncode == 2 and done.stderr.startswith(said) and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.endswith("; set train.compile: false to train without it\n")
    manifest = json.loads((tmp_path / "broken" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("ConfigError: train.compile: torch.compile")
