"""`python tests/fill_disk.py STEP LEAVE EXPERIMENT [--set KEY=VALUE ...]`: `tunelab train`, except that after
optimizer step STEP a file beside the run takes all but LEAVE bytes of the disk's free space, as another job
filling the disk would. The filler joins the run through train's public `callbacks` seam; tunelab has no test hook.
Prints `error: <message>` and exits 2 on a tunelab error, as the command line does."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback

from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.train import train


class FillDisk(TrainerCallback):
    def __init__(self, step: int, leave: int, filler: Path) -> None:
        self.step, self.leave, self.filler = step, leave, filler

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            free = shutil.disk_usage(self.filler.parent).free
            with open(self.filler, "wb") as f:
                f.write(b"\0" * max(0, free - self.leave))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", type=int)
    parser.add_argument("leave", type=int)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    exp = load_experiment(args.experiment, args.overrides)
    filler = Path(exp.output.dir) / "filler"
    try:
        train(exp, callbacks=[FillDisk(args.step, args.leave, filler)])
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
