"""`python tests/crash_after_save.py STEP EXPERIMENT [--set KEY=VALUE ...] [--name NAME]`: `tunelab train`, except that
the process kills itself with SIGKILL right after checkpoint STEP is saved, as a crash would. The kill joins the run
through train's public `callbacks` seam; tunelab itself has no test hook. Runs under torchrun as well (each rank
kills itself)."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

from tunelab.config import load_experiment
from tunelab.train import train


class CrashAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.global_step >= self.step:
            import torch.distributed as dist

            if dist.is_initialized():  # every rank has written its part of the checkpoint (its RNG state) first
                dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", type=int)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--name")
    args = parser.parse_args()
    exp = load_experiment(args.experiment, args.overrides, run_name=args.name)
    train(exp, callbacks=[CrashAfterSave(args.step)])


if __name__ == "__main__":
    main()
