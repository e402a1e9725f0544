"""Shared fixtures, and the test run's hermetic environment.

Every test run is offline (the Hugging Face libraries' offline switches, and no socket may leave this machine) and
has a cache of its own: `$TUNELAB_HOME` is a fresh folder per run, so no test reads reference log-probs or weight
digests an earlier run computed (the built-in model ships with tunelab, the same bytes everywhere). Commands run from
a scratch working directory, so a test that forgets `output.dir` cannot write into the repository's runs/."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "data"
CONFIGS = Path(__file__).parent / "fixtures" / "configs"
SCRATCH = Path(tempfile.mkdtemp(prefix="tunelab-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)  # rmtree removes the models/ link, not the models
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TRACKIO_DIR": str(SCRATCH / "trackio"),  # Trackio's local store, read when trackio is imported
}


def _hermetic_home() -> Path:
    home = SCRATCH / "home"
    home.mkdir()
    return home


def _threads_per_worker() -> dict[str, str]:
    """Under pytest-xdist (`make test` runs one worker per core), each worker's torch and tokenizers get their share
    of the cores: both take them all by default, and N workers each spinning N threads run slower than one alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers == 1:
        return {}
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    return {"OMP_NUM_THREADS": share, "RAYON_NUM_THREADS": share}


os.environ.update(OFFLINE)
os.environ.update(_threads_per_worker())
os.environ["TUNELAB_HOME"] = str(_hermetic_home())
(SCRATCH / "cwd").mkdir()
_FORKED_ENVIRONMENT = dict(os.environ)  # the environment of every test's commands, unless a test sets another
_connect = socket.socket.connect


def _local_only(self: socket.socket, address) -> None:
    """Tests reach no network: loopback (the distributed tests' rendezvous) and Unix sockets only."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if host not in ("localhost", "::1") and not host.startswith("127."):
            raise OSError(f"tests are offline: a connection to {address} was attempted")
    _connect(self, address)


socket.socket.connect = _local_only  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tunelab.builtin import materialise

    return materialise("tiny-chat")


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """Run `tunelab ...` in a new process, as a user would; `env` adds environment variables (None removes one).
    The process is forked from one that has imported the libraries (tests/forked_cli.py) unless `fresh` asks for a
    new interpreter (a test of what the terminal shows)."""
    return run_python(["-m", "tunelab", *args], cwd or SCRATCH / "cwd", timeout, env, fresh)


def run_python(
    argv: list[str], cwd: Path, timeout: int, env: dict | None = None, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python <argv>` in a new process: forked as run_cli says where the libraries it imports would read the same
    environment as the forking server's, a new interpreter otherwise (another environment, --verbose)."""
    argv = [str(arg) for arg in argv]
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    if fresh or "--verbose" in argv or _as_commands_set(environment) != _as_commands_set(_FORKED_ENVIRONMENT):
        command = [sys.executable, *argv]
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=environment)
    return _forked(argv, cwd, timeout, environment)


def _as_commands_set(environment: dict[str, str]) -> dict[str, str]:
    """The environment a tunelab command's libraries read: its quiet switches set where unset (QUIET_LIBRARIES).
    Left out: the name of the test that pytest sets, and the cache folder torch's inductor sets to its default in a
    process that imports it."""
    from tunelab.console import QUIET_LIBRARIES

    return {k: v for k, v in {**QUIET_LIBRARIES, **environment}.items() if k not in _SET_IN_PROCESS}


def _forked(argv: list[str], cwd: Path, timeout: int, environment: dict[str, str]) -> subprocess.CompletedProcess:
    import multiprocessing

    from tests import forked_cli

    context = multiprocessing.get_context("forkserver")
    arguments = (argv, _fork_server(), str(cwd), environment)
    streams = Path(tempfile.mkdtemp(dir=SCRATCH))
    out, err = streams / "out", streams / "err"
    process = context.Process(target=forked_cli.run, args=(*arguments, str(out), str(err)))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
    done = subprocess.CompletedProcess(
        [sys.executable, *argv], process.exitcode, out.read_text(errors="replace"), err.read_text(errors="replace")
    )
    shutil.rmtree(streams)
    return done


@functools.cache
def _fork_server() -> list[str]:
    """Start the forkserver, its libraries imported in the environment a command gives them; return a new
    interpreter's sys.path after its first entry (the script's folder, or the working directory)."""
    from multiprocessing import forkserver

    from tests import forked_cli

    if str(REPO) not in sys.path:  # the server imports tests.forked_cli by this process's sys.path
        sys.path.append(str(REPO))
    shown = subprocess.run([sys.executable, "-c", "import sys, json; print(json.dumps(sys.path[1:]))"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    forkserver.set_forkserver_preload(forked_cli.PRELOAD)
    own = dict(os.environ)
    os.environ.clear()
    os.environ.update(_as_commands_set(_FORKED_ENVIRONMENT))
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(own)
    return json.loads(shown.stdout)


_SET_IN_PROCESS = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")


def straight_and_killed(example: str, kill_after: int, out: Path, *args: str) -> tuple[list[str], int]:
    """Train an example twice into `out`: "crashed" killed with SIGKILL right after checkpoint `kill_after`, and
    "straight" to the end. Returns the arguments that rerun "crashed", and its exit code."""
    nproc = 1
    if "--nproc" in args:  # the crash helper runs under torchrun itself
        at = args.index("--nproc")
        nproc, args = int(args[at + 1]), (*args[:at], *args[at + 2 :])
    plain = [str(EXAMPLES / f"{example}.yaml"), "--set", f"output.dir={out}", *args, "--name", "crashed"]
    killed = crash_after_save(kill_after, *plain, nproc=nproc)
    if nproc == 1:
        # The uninterrupted run trains in this process: the CLI's own library call, so its numbers are the CLI's,
        # without another start of Python and the libraries.
        from tunelab.config import load_experiment
        from tunelab.train import train

        assert args[::2] == ("--set",) * (len(args) // 2), "only --set settings train in this process"
        train(load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={out}", *args[1::2]], run_name="straight"))
        return ["train", *plain], killed.returncode
    launched = ["--nproc", str(nproc)]
    straight = run_cli("train", *plain[:-1], "straight", *launched)
    assert straight.returncode == 0, straight.stderr[-3000:]
    return ["train", *plain, *launched], killed.returncode


def crash_after_save(step: int, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run `tunelab train <args>` in a fresh process (or `nproc` under torchrun) that SIGKILLs itself right after
    checkpoint `step`, as a crash would: tests/crash_after_save.py adds that callback through train's public
    `callbacks` seam."""
    script = [str(Path(__file__).parent / "crash_after_save.py"), str(step), *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return run_python([*launcher, *script], SCRATCH / "cwd", 600, fresh=nproc > 1)


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
    # a method that samples its replies keeps the same replies for every step, the one logged before the kill too
    straight, crashed = kept_rollouts(out / "straight"), kept_rollouts(out / "crashed")
    assert straight.keys() == crashed.keys() and all(straight[k].equals(crashed[k]) for k in straight)


def kept_rollouts(run_dir: Path) -> dict:
    """The replies a run kept (rollouts/<kind>-<step>.parquet), by (kind, step): pandas DataFrames."""
    import pandas as pd

    found = {}
    for file in (run_dir / "rollouts").glob("*.parquet"):
        kind, _, step = file.stem.partition("-")
        found[(kind, int(step))] = pd.read_parquet(file)
    return found


def fake_run(folder: Path, name: str, fingerprint: str = "f", **fields) -> Path:
    """A completed LoRA run folder holding only a manifest (base "m" with this fingerprint, plus `fields`): enough
    for the checks commands make before loading anything."""
    run = folder / name
    run.mkdir()
    manifest = {
        "name": name,
        "status": "completed",
        "scope": "lora",
        "base_model": {"id": "m", "fingerprint": fingerprint},
    }
    (run / "manifest.json").write_text(json.dumps({**manifest, **fields}))
    return run


def write_experiment(folder: Path, text: str, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def trained_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tunelab.runs import read_manifest

    manifest = read_manifest(run_dir)
    name = {"adapter": "adapter/adapter_model.safetensors", "model": "model/model.safetensors"}.get(
        manifest.result, manifest.result
    )
    return load_file(str(run_dir / name))


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b| over all tensors together."""
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5
    return diff / sum(float(t.norm() ** 2) for t in b.values()) ** 0.5


def dataset_repository(folder: Path, splits: dict[str, list[dict]], readme: bool = True) -> Path:
    """A folder laid out as `hf download --repo-type dataset` writes a hub dataset repository: parquet shards under
    data/ named by split, and the README's `configs` naming them (HuggingFaceH4/ultrachat_200k's layout, with its
    train_sft / test_sft splits); without `readme`, datasets infers the splits from the file names."""
    import datasets

    (folder / "data").mkdir(parents=True)
    configs = []
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / f"{split}-00000-of-00001-3f1a.parquet"))
        configs.append(f"  - split: {split}\n    path: data/{split}-*\n")
    if readme:
        (folder / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(configs) + "---\n"
        )
    return folder


def can_mount_small_disks() -> bool:
    """Whether this machine lets a test mount a small tmpfs of its own (`unshare -Urm`: a private user and mount
    namespace), to fill a disk without touching the machine's."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            mounted = ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder}"]
            return subprocess.run(mounted, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
