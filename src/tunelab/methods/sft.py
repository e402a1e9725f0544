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
    also: dict[str, Dataset] | None = None,
) -> SFTTrainer:
    """`also`: data.eval_also's sets, scored beside `eval_rows` at every evaluation (eval_<name>_loss)."""
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
    held_out = {PRIMARY: eval_rows, **also} if also else eval_rows
    return instantiate(
        scoring_also(seeded(SFTTrainer)),
        model,
        config,
        tokenizer,
        train_rows,
        held_out,
        callbacks,
        data_collator=collator,
    )


PRIMARY = "eval"  # the eval data's name among several held-out sets: its loss stays eval_loss


def scoring_also(trainer_class: type) -> type:
    """The trainer class scoring several held-out sets: the eval data as eval_loss, which checkpoints, early stopping
    and the run's record follow, then each of data.eval_also's as eval_<name>_loss. (Transformers' own dict of eval
    sets names every one, so eval_loss would go; and TRL logs its token accuracy and entropy of each set as eval_*,
    here eval_<name>_* for a named set.)"""

    class ScoringAlso(trainer_class):
        scoring: str | None = None

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if eval_dataset is not None or not isinstance(self.eval_dataset, dict):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            from transformers import EarlyStoppingCallback

            metrics = super().evaluate(self.eval_dataset[PRIMARY], ignore_keys, metric_key_prefix)
            # Early stopping follows eval_loss alone (on another set's metrics it logs that it is disabled).
            handler = self.callback_handler
            every = handler.callbacks
            handler.callbacks = [c for c in every if not isinstance(c, EarlyStoppingCallback)]
            try:
                for name, dataset in self.eval_dataset.items():
                    if name != PRIMARY:
                        self.scoring = name
                        metrics |= super().evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}")
            finally:
                self.scoring, handler.callbacks = None, every
            return metrics

        def log(self, logs, start_time=None):
            kept = getattr(self, "_metrics", {}).get("eval") if self.scoring else None
            if kept:  # TRL's per-set metrics, which it names eval_<metric> whatever the set
                for key in list(kept):
                    kept[f"{self.scoring}_{key}"] = kept.pop(key)
            super().log(logs, start_time)

    ScoringAlso.__name__ = ScoringAlso.__qualname__ = trainer_class.__name__
    return ScoringAlso


def build(inputs: TrainerInputs) -> SFTTrainer:
    """Rows as `plan` previewed them: tokenized, with the loss mask as labels."""
    train_rows = inputs.encoded[0].dataset()
    eval_rows = inputs.encoded[1].dataset() if inputs.splits.eval else None
    also = {name: encoded.dataset() for name, encoded in inputs.also.items()}
    return build_trainer(
        inputs.model,
        inputs.tokenizer,
        train_rows,
        eval_rows,
        inputs.exp.train,
        inputs.hw,
        inputs.output_dir,
        inputs.callbacks,
        also,
    )


METHOD = Method(
    name="sft",
    formats=("messages", "conversations", "prompt_completion", "alpaca", "text"),
    sequences=1,
    reference=False,
    padding_free=True,
    build=build,
    fused_head=True,
    router_aux_loss=True,
)
