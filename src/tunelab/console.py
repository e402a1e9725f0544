"""What reaches the terminal: tunelab's own lines; the libraries' progress bars, logs and warnings go to the run's
train.log instead (or nowhere, outside a run), unless `tunelab --verbose`.

Transformers, datasets, TRL, PEFT and accelerate each log through Python's logging (Transformers through its own
library logger with its own stderr handler) and warn through `warnings`; the Hugging Face progress bars obey
environment switches read when the libraries load. So the switches are set before any command imports them, and
a run routes all of it into one file beside its manifest.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TRAIN_LOG = "train.log"
STATE = {"verbose": False}
# The libraries' switches a command sets, only where the user has not chosen, unless --verbose
QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",  # its "Retrying in 8s" lines on a flaky network
}


def human_seconds(seconds: float | None) -> str | None:
    """A duration as a person reads it: 6.5 s, 12 min 03 s, 2 h 05 min."""
    if seconds is None:
        return None
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def set_verbosity(verbose: bool) -> None:
    """Decide, before the libraries load, whether their own output reaches the terminal."""
    STATE["verbose"] = verbose
    if verbose:
        return
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    # transformers deprecates a name PEFT still calls; the warning says nothing to a tunelab user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.captureWarnings(True)  # warnings become records of the "py.warnings" logger ...
    # ... and no library's log record falls through to Python's last-resort stderr handler (bitsandbytes logs a
    # warning as it loads on CPUs with AVX512-BF16); a run's train.log still gets them all (run_log)
    logging.getLogger().addHandler(logging.NullHandler())


@contextmanager
def run_log(run_dir: Path) -> Iterator[None]:
    """While a run trains, every library's log records (INFO and up) and warnings are appended to
    <run>/train.log; with --verbose they reach the terminal as well."""
    import transformers

    handler = logging.FileHandler(run_dir / TRAIN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(), logging.getLogger("transformers")]  # transformers does not propagate
    levels = [lg.level for lg in loggers]
    verbosity = transformers.logging.get_verbosity()
    for lg in loggers:
        lg.addHandler(handler)
    echo = logging.StreamHandler()  # --verbose: the other libraries' warnings on the terminal too
    echo.setLevel(logging.WARNING)
    if STATE["verbose"]:
        loggers[0].addHandler(echo)
    transformers.logging.set_verbosity_info()
    if not STATE["verbose"]:
        transformers.logging.disable_default_handler()
    logging.getLogger().setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        loggers[0].removeHandler(echo)
        transformers.logging.set_verbosity(verbosity)
        if not STATE["verbose"]:
            transformers.logging.enable_default_handler()
        handler.close()
