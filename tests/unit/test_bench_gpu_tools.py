"""What keeps a lent GPU's minutes from being lost: the wheels fit the 64 MiB that travels (bench/gpu/slim_wheel.py),
and a row that breaks on the GPU is one line in the tables while the other rows are still measured."""

import subprocess
import sys
import zipfile
from pathlib import Path

from bench.gpu.bench import attempt, markdown
from bench.gpu.slim_wheel import slim

LIBS = ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025")
DROP = r"pkg/lib_(cuda1[0-2][0-9]|rocm[0-9]+|xpu[0-9]+)\.so"


def fake_wheel(folder: Path) -> Path:
    """A wheel laid out as bitsandbytes' is: a package, one native library per accelerator release, a RECORD."""
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": b"VERSION = '1.0'\n"} | {f"pkg/lib_{lib}.so": lib.encode() * 1000 for lib in LIBS}
    files["pkg-1.0.dist-info/METADATA"] = b"Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n"
    files["pkg-1.0.dist-info/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = "".join(f"{name},,\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    return wheel


def test_a_slimmed_wheel_keeps_the_cuda_13_libraries_and_installs_with_pip(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path)
    dropped = slim(wheel, DROP)
    assert sorted(dropped) == ["pkg/lib_cuda118.so", "pkg/lib_cuda128.so", "pkg/lib_rocm64.so", "pkg/lib_xpu2025.so"]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = {line.split(",")[0] for line in z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()}
    assert record == names  # RECORD lists exactly what the wheel holds
    assert {f"pkg/lib_{lib}.so" for lib in ("cpu", "cuda130", "cuda132")} <= names
    assert slim(wheel, DROP) == []  # nothing left to drop: the wheel is left as it is
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (site / "pkg").glob("*.so")) == ["lib_cpu.so", "lib_cuda130.so", "lib_cuda132.so"]
    assert (site / "pkg" / "lib_cuda130.so").read_bytes() == b"cuda130" * 1000


def test_a_row_that_fails_on_the_gpu_is_one_line_and_the_others_stay() -> None:
    def out_of_memory() -> dict:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    failed = attempt(out_of_memory)
    assert failed == {"failed": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    assert attempt(lambda a, b: {"sum": a + b}, 1, 2) == {"sum": 3}
    measured = {"tokens_per_s": 1000.0, "steady_tokens_per_s": 1100.0, "first_step_s": 2.0, "final_loss": 1.5}
    results = {
        "hardware": "H200",
        "date": "2026-12-04",
        "model": "Llama-3.1-8B",
        "parameters": 8_030_261_248,
        "steps": 12,
        "max_length": 1024,
        "speed": {"plain-trl": measured | {"mfu": 0.3}, "tunelab": failed},
        "memory": {"qlora": failed, "partial-last4": {"estimated_bytes": 2**30, "peak_bytes": 2**30, "error": 0.0}},
    }
    table = markdown(results)
    assert "| tunelab | failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB |" in table
    assert "| qlora | failed: RuntimeError: CUDA out of memory" in table
    assert "| plain-trl | 1,000 | 1.00x | 1,100 | 30.0% | 2.0 s | 1.5000 |" in table
    assert "| partial-last4 | 1.00 GiB | 1.00 GiB | +0.0% |" in table
