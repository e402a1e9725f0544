"""SimPO: preference pairs, no reference model (length-normalised log-probs with a target margin).

TRL implements SimPO as its CPO trainer with `loss_type="simpo"` and `cpo_alpha=0` (no SFT term), under
`trl.experimental` in 1.16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.preference import reference_free_trainer

if TYPE_CHECKING:
    from transformers import Trainer


def build(inputs: TrainerInputs) -> Trainer:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    settings = inputs.exp.simpo
    return reference_free_trainer(
        inputs, CPOConfig, CPOTrainer, loss_type="simpo", cpo_alpha=0.0, beta=settings.beta, simpo_gamma=settings.gamma
    )


METHOD = Method(
    name="simpo",
    formats=("preference",),
    sequences=2,
    reference=False,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.simpo,
)
