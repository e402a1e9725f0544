"""SFT: experiment + scoped model + data -> TRL's SFTConfig and SFTTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import TrainSettings
from tunelab.methods.common import Hardware, instantiate, training_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTTrainer

CHAT_FORMATS = ("messages", "conversations", "alpaca")


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    data_format: str,
    train: TrainSettings,
    hw: Hardware,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> SFTTrainer:
    from trl import SFTConfig, SFTTrainer

    from tunelab.methods.sampling import seeded_train_sampler

    config = SFTConfig(
        **training_arguments(train, hw, output_dir, eval_rows is not None),
        max_length=train.max_length,
        packing=train.packing,
        # Chats learn only from assistant turns; prompt/completion data from the completion (TRL's default).
        assistant_only_loss=data_format in CHAT_FORMATS,
    )

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return seeded_train_sampler(super()._get_train_sampler(*args, **kwargs), train.seed)

    return instantiate(Trainer, model, config, tokenizer, train_rows, eval_rows, callbacks)
