"""The GPU benchmark's --smoke mode, so the script a lent GPU runs never rots (bench/gpu/bench.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_benchmark_smoke_mode_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu" / "bench.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "TUNELAB_BENCH_WORK": str(tmp_path / "work")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    assert set(results["speed"]) == {"plain-trl", "tunelab-equal", "tunelab", "tunelab-compile"}
    assert set(results["memory"]) == {"lora", "qlora", "partial-last4"}
    for run in results["speed"].values():
        assert run["tokens_per_s"] > 0 and run["final_loss"] > 0
    # Compiling trains the same steps as the defaults it compiles (on CPU the first step pays for compilation).
    compiled, default = results["speed"]["tunelab-compile"], results["speed"]["tunelab"]
    assert compiled["final_loss"] == pytest.approx(default["final_loss"], rel=1e-4)
    assert compiled["first_step_s"] > default["first_step_s"] and compiled["steady_tokens_per_s"] > 0
    # Equal settings, equal data and seed: tunelab reproduces the plain script's loss.
    assert results["speed"]["tunelab-equal"]["final_loss"] == pytest.approx(
        results["speed"]["plain-trl"]["final_loss"], rel=1e-3
    )
    assert all(m["estimated_bytes"] > 0 for m in results["memory"].values())
    assert "| plain-trl |" in (out / "bench.md").read_text()
