"""Train samplers whose order is a function of the experiment (seed, epoch) alone, so a resumed run replays it.

Transformers' train-time LengthGroupedSampler draws its shuffle from the global RNG, whose state at
the start of an epoch differs between an uninterrupted run and one resumed from a checkpoint, so the
resumed run sees other batches. Seeding the shuffle with (seed, epoch) makes every epoch's order a
function of the experiment alone. The Trainer calls `set_epoch` on the sampler before each epoch.
BatchRebalanceSampler seeds itself by (seed, epoch), but with a fixed seed unless told the experiment's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeeded(Sampler[int]):
    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler = sampler
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.generator = torch.Generator().manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def seeded_train_sampler(sampler: Sampler | None, seed: int) -> Sampler | None:
    """The Trainer's train sampler, drawing its order from the experiment's seed."""
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    if isinstance(sampler, BatchRebalanceSampler):
        sampler.seed = seed  # seeded by (seed, epoch) already, but the Trainer leaves the seed at 42
    elif sampler is not None and hasattr(sampler, "generator") and sampler.generator is None:
        return EpochSeeded(sampler, seed)
    return sampler


def seeded(trainer_class: type) -> type:
    """The trainer class with its train sampler drawing its order from the experiment's seed (args.seed)."""

    class Seeded(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return seeded_train_sampler(super()._get_train_sampler(*args, **kwargs), self.args.seed)

    Seeded.__name__ = Seeded.__qualname__ = trainer_class.__name__
    return Seeded
