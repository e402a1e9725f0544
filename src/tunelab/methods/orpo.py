"""ORPO: preference pairs, no reference model (an odds-ratio term on top of SFT) -> TRL's ORPOTrainer.

TRL 1.16 keeps ORPO under `trl.experimental`; tunelab pins that version (constraints.txt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.preference import preference_arguments, preference_rows

if TYPE_CHECKING:
    from transformers import Trainer


def build(inputs: TrainerInputs) -> Trainer:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from tunelab.methods.sampling import seeded

    exp = inputs.exp
    train_rows, eval_rows = preference_rows(inputs)
    config = trl_config(
        ORPOConfig,
        **preference_arguments(exp.train, inputs.hw, inputs.output_dir, eval_rows is not None, "orpo"),
        beta=exp.orpo.beta,
        max_length=exp.train.max_length,
    )
    return instantiate(
        seeded(ORPOTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks
    )


METHOD = Method(
    name="orpo",
    formats=("preference",),
    sequences=2,
    reference=False,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.orpo,
)
