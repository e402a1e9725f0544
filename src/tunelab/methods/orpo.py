"""ORPO: preference pairs, no reference model (an odds-ratio term on top of SFT) -> TRL's ORPOTrainer.

TRL 1.16 keeps ORPO under `trl.experimental`; tunelab pins that version (constraints.txt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.preference import reference_free_trainer

if TYPE_CHECKING:
    from transformers import Trainer


def build(inputs: TrainerInputs) -> Trainer:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return reference_free_trainer(inputs, ORPOConfig, ORPOTrainer, beta=inputs.exp.orpo.beta)


METHOD = Method(
    name="orpo",
    formats=("preference",),
    sequences=2,
    reference=False,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.orpo,
)
