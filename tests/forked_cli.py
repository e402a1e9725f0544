"""Fresh `tunelab` processes without paying for the libraries' import each time.

Every `tunelab train` the tests start as a user would spends about 7 of its 10 seconds importing torch, Transformers,
PEFT (which imports bitsandbytes, which compiles its kernels' wrappers), TRL and datasets. The tests start some 150
such processes. Here they are forked from a server (the standard library's forkserver) that imported those libraries
once and nothing of tunelab: each process is still a new one, with its own pid, exit code, signals, working directory
and standard streams, that imports tunelab afresh and runs `python -m tunelab ...` (or a test script) as `__main__`.

What a forked process cannot differ in is what the libraries read from the environment when imported, so a call
with an environment other than the server's runs in a plain new interpreter instead (conftest's `run_python`). Tests of what
the terminal shows (import-time warnings among it) start plain processes too: the server printed those.

This module is the forked processes' entry: it imports nothing heavy, and nothing of the tests."""

from __future__ import annotations

import os
import runpy
import sys

# The libraries every `tunelab` command imports, and the modules of theirs that take long to import.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.trainer",
    "peft",
    "datasets",
    "accelerate",
    "trl",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
]


def run(argv: list[str], path: list[str], cwd: str, environment: dict[str, str], out: str, err: str) -> None:
    """In the forked process: `python <argv>` where argv is `-m module ...` or `script ...`, with `path` as a new
    interpreter's sys.path after its first entry, the streams written to the files `out` and `err`. The exit code
    is the process's (multiprocessing turns SystemExit into it, and an exception into 1 after its traceback)."""
    for fd, name in ((1, out), (2, err)):
        file = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    if argv[0] == "-m":
        sys.argv, sys.path = ["-m", *argv[2:]], [cwd, *path]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path = list(argv), [os.path.dirname(os.path.abspath(argv[0])), *path]
        runpy.run_path(argv[0], run_name="__main__")
