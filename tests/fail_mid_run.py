"""`python tests/fail_mid_run.py STEP (--fill-disk LEAVE | --oom) EXPERIMENT [--set KEY=VALUE ...]`: `tunelab train`,
except that after optimizer step STEP trouble comes, as it does on real machines:
- `--fill-disk LEAVE`: a file beside the run takes all but LEAVE bytes of the disk's free space (another job filling
  the disk);
- `--oom`: the device runs out of memory: torch's own OutOfMemoryError, with the message CUDA's allocator writes.
The trouble joins the run through train's public `callbacks` seam; tunelab has no test hook. Prints
`error: <message>` and exits 2 on a tunelab error, as the command line does."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.train import train

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is "
    "free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated memory 74.50 GiB "
    "is allocated by PyTorch, and 2.31 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory "
    "is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)


class Trouble(TrainerCallback):
    def __init__(self, step: int, leave: int | None, filler: Path) -> None:
        self.step, self.leave, self.filler = step, leave, filler

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step != self.step:
            return
        if self.leave is None:
            raise torch.OutOfMemoryError(CUDA_OOM)
        free = shutil.disk_usage(self.filler.parent).free
        with open(self.filler, "wb") as f:
            f.write(b"\0" * max(0, free - self.leave))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step", type=int)
    trouble = parser.add_mutually_exclusive_group(required=True)
    trouble.add_argument("--fill-disk", type=int, metavar="LEAVE")
    trouble.add_argument("--oom", action="store_true")
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    exp = load_experiment(args.experiment, args.overrides)
    filler = Path(exp.output.dir) / "filler"
    try:
        train(exp, callbacks=[Trouble(args.step, args.fill_disk, filler)])
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
