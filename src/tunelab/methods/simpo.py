"""SimPO: preference pairs, no reference model (length-normalised log-probs with a target margin).

TRL implements SimPO as its CPO trainer with `loss_type="simpo"` and `cpo_alpha=0` (no SFT term), under
`trl.experimental` in 1.16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.preference import preference_arguments, preference_rows

if TYPE_CHECKING:
    from transformers import Trainer


def build(inputs: TrainerInputs) -> Trainer:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from tunelab.methods.sampling import seeded

    exp = inputs.exp
    train_rows, eval_rows = preference_rows(inputs)
    config = trl_config(
        CPOConfig,
        **preference_arguments(exp.train, inputs.hw, inputs.output_dir, eval_rows is not None, "simpo"),
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=exp.simpo.beta,
        simpo_gamma=exp.simpo.gamma,
        max_length=exp.train.max_length,
    )
    return instantiate(
        seeded(CPOTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks
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
