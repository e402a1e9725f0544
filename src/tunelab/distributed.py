"""Several processes through torchrun, and the guards against its silent failure modes.

`tunelab train --nproc N` re-launches itself under `torch.distributed.run`; the Trainer (through
accelerate) then runs DDP. Two traps train without an error: processes that each train alone on all
the data, and data that is sharded while gradients are never averaged (ranks drift apart). The first
is caught before training by checking that the Trainer sees the launcher's world size; the second
after training by comparing every rank's trained weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from tunelab.errors import TunelabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launch(nproc: int, argv: list[str]) -> int:
    """Run `tunelab <argv>` in `nproc` processes on this machine; returns the launcher's exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tunelab",
        *argv,
    ]
    return subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    ).returncode


def check_launch(trainer_world_size: int) -> None:
    """Refuse a multi-process launch in which the Trainer would not run distributed."""
    launched = world_size()
    if launched > 1 and trainer_world_size != launched:
        raise TunelabError(
            f"launched with {launched} processes but the Trainer sees a world of {trainer_world_size}: every "
            "process would train alone on all the data. On CPU the run needs use_cpu with the gloo backend "
            "(tunelab sets it); check the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR)"
        )


def trained_digest(model, names: list[str]) -> str:
    import torch

    params = dict(model.named_parameters())
    h = hashlib.sha256()
    for name in names:
        h.update(params[name].detach().float().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_synced(model, names: list[str]) -> list[str]:
    """Every rank's digest of the trained weights; raises if they differ (gradients were not averaged)."""
    import torch.distributed as dist

    mine = trained_digest(model, names)
    if world_size() == 1 or not dist.is_initialized():
        return [mine]
    digests: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) != 1:
        raise TunelabError(
            f"the {len(digests)} processes ended with different weights ({', '.join(digests)}): "
            "gradients were not synchronised, so the run is not one training run"
        )
    return digests


def unprepare_after_evaluate(trainer) -> None:
    """Undo the evaluation-only preparation that `Trainer.evaluate()` leaves on the model.

    `evaluate()` before `train()` marks the model as prepared by accelerate without wrapping it in
    DistributedDataParallel; `train()` then sees the mark, skips the wrap, and each process trains on
    its own shard with gradients never averaged. tunelab measures the untrained eval loss that way,
    so in a multi-process run it clears the mark (and the autocast forward it installed) first.
    """
    model = trainer.model
    if world_size() == 1 or not getattr(model, "_is_accelerate_prepared", False):
        return
    if hasattr(model, "_original_forward"):
        model.forward = model._original_forward
        del model._original_forward
    del model._is_accelerate_prepared
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not model]


def finish() -> None:
    """Leave together: a process that tears down its process group while another still talks to it
    can abort (gloo), failing a run whose work is done."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
