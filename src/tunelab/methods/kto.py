"""KTO: thumbs-up / thumbs-down completions (or preference pairs, unpaired as TRL does) -> TRL's KTOTrainer.

Like DPO it measures the policy against a reference: for LoRA the base with the adapter disabled, for
other scopes a frozen copy of the starting model, or log-probs precomputed once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.preference import frozen_copy, preference_arguments, preference_rows

if TYPE_CHECKING:
    from trl import KTOTrainer


def build(inputs: TrainerInputs) -> KTOTrainer:
    from trl import KTOConfig, KTOTrainer

    from tunelab.methods.sampling import seeded

    exp, settings = inputs.exp, inputs.exp.kto
    train_rows, eval_rows = preference_rows(inputs)
    args = preference_arguments(exp.train, inputs.hw, inputs.output_dir, eval_rows is not None, "kto", len(train_rows))
    # KTO draws the KL sample of each completion from its batch neighbours, so TRL trains it in the dataset's order.
    args["train_sampling_strategy"] = "sequential"
    train_rows = shuffled_unpaired(train_rows, exp.train.seed)
    config = trl_config(
        KTOConfig,
        **args,
        beta=settings.beta,
        desirable_weight=settings.desirable_weight,
        undesirable_weight=settings.undesirable_weight,
        max_length=exp.train.max_length,
        precompute_ref_log_probs=inputs.reference == "precomputed",
    )
    extra = {"ref_model": frozen_copy(inputs.model)} if inputs.reference == "copy" else {}
    return instantiate(
        seeded(KTOTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks, **extra
    )


def shuffled_unpaired(rows: list[dict], seed: int) -> list[dict]:
    """KTO's training order: pairs unpaired as TRL unpairs them (chosen desirable, rejected undesirable), then shuffled
    once with the seed. TRL's unpairing puts every desirable row before every undesirable one and KTO keeps that order,
    so an epoch pushed all chosen answers up and then all rejected ones down, and the pairs were never learned;
    thumbs-up/down data may arrive sorted by label too."""
    from trl.data_utils import maybe_unpair_preference_dataset

    from tunelab.methods.common import rows_dataset

    return maybe_unpair_preference_dataset(rows_dataset(rows)).shuffle(seed=seed).to_list()


METHOD = Method(
    name="kto",
    formats=("preference", "unpaired"),
    sequences=2,  # each completion and a mismatched one for the KL estimate
    reference=True,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.kto,
    fused_head=True,
    router_aux_loss=True,
)
