"""Reward modelling: preference pairs -> TRL's RewardTrainer, on the base model with a score head.

The model is the base with a new score head in place of lm_head (AutoModelForSequenceClassification, one label): it
reads a whole conversation and gives one number, trained so the chosen answer scores above the rejected one
(Bradley-Terry: -log sigmoid(chosen - rejected)). The head starts random and trains in every scope; LoRA adapts
the chosen modules as for any method (PEFT's SEQ_CLS task, the head trained whole beside the adapter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.preference import preference_arguments, preference_rows

if TYPE_CHECKING:
    from transformers import Trainer
    from trl import RewardTrainer

    from tunelab.config import Experiment


def build(inputs: TrainerInputs) -> RewardTrainer:
    from trl import RewardConfig, RewardTrainer

    from tunelab.methods.sampling import seeded

    exp = inputs.exp
    train_rows, eval_rows = preference_rows(inputs)
    args = preference_arguments(
        exp.train, inputs.hw, inputs.output_dir, eval_rows is not None, "reward", len(train_rows)
    )
    config = trl_config(
        RewardConfig,
        **args,
        max_length=exp.train.max_length,
        center_rewards_coefficient=exp.reward.center_rewards,
    )
    return instantiate(
        seeded(RewardTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks
    )


def pair_accuracy(trainer: Trainer) -> float | None:
    """Share of the held-out pairs whose chosen answer the model scores above the rejected one, on the pairs as the
    trainer tokenized and batched them (every rank's share, gathered); None without held-out pairs."""
    import torch

    if trainer.eval_dataset is None:
        return None
    model = trainer.model
    was_training = model.training
    model.eval()
    wins, pairs = 0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
            chosen, rejected = torch.chunk(scores.float(), chunks=2)
            # every rank's pairs, without the ones the last batch repeats to even out the ranks
            won = trainer.accelerator.gather_for_metrics((chosen > rejected).int())
            wins, pairs = wins + int(won.sum().item()), pairs + won.numel()
    model.train(was_training)
    return wins / max(pairs, 1)


def describe(exp: Experiment) -> str:
    center = exp.reward.center_rewards
    centred = f"; the squared mean score of each pair penalised x {center:g} (centred scores)" if center else ""
    return (
        "reward model: the chosen and the rejected conversation of each pair scored whole by a new score head (at "
        f"the last token), trained so the chosen one scores higher (-log sigmoid of the difference){centred}"
    )


METHOD = Method(
    name="reward",
    formats=("preference",),
    sequences=2,  # the chosen and the rejected conversation of each pair, in one batch
    reference=False,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.reward,
    pair_accuracy=pair_accuracy,
    describe=describe,
)
