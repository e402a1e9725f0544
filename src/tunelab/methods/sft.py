"""SFT: experiment + scoped model + tokenized, labelled rows -> TRL's SFTConfig and SFTTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import TrainSettings
from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import Hardware, batching, instantiate, training_arguments, trl_config

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTTrainer


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: Dataset,
    eval_rows: Dataset | None,
    train: TrainSettings,
    hw: Hardware,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> SFTTrainer:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunelab.methods.sampling import seeded

    batches = batching(train, "sft", hw.packed_rows_apart)
    config = trl_config(
        SFTConfig,
        **training_arguments(train, hw, output_dir, eval_rows is not None, batches),
        max_length=train.max_length,
        packing=train.packing,
        # Rows arrive tokenized with their labels (tunelab.templates.encode, the code plan previews): TRL
        # truncates them and drops rows left without loss, and must not re-derive masks from the template.
        assistant_only_loss=False,
    )

    # TRL's own padding-free collator, handed over rather than switched on with `padding_free=True`: the
    # latter refuses a max_length (a guard from before trl 1.16 truncated during dataset preparation, which
    # it now does whenever max_length is set), and tunelab must keep truncating. A test checks both.
    collator = (
        DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True) if batches.padding_free else None
    )
    return instantiate(
        seeded(SFTTrainer), model, config, tokenizer, train_rows, eval_rows, callbacks, data_collator=collator
    )


def build(inputs: TrainerInputs) -> SFTTrainer:
    """Rows as `plan` previewed them: tokenized, with the loss mask as labels."""
    train_rows = inputs.encoded[0].dataset()
    eval_rows = inputs.encoded[1].dataset() if inputs.splits.eval else None
    return build_trainer(
        inputs.model,
        inputs.tokenizer,
        train_rows,
        eval_rows,
        inputs.exp.train,
        inputs.hw,
        inputs.output_dir,
        inputs.callbacks,
    )


METHOD = Method(
    name="sft",
    formats=("messages", "conversations", "prompt_completion", "alpaca", "text"),
    sequences=1,
    reference=False,
    padding_free=True,
    build=build,
    fused_head=True,
)
