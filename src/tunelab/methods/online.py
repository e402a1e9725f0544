"""What the methods that sample their own replies share (GRPO, distill): their prompts as TRL takes them, the
arguments their configs take alike, and the check that every prompt leaves room for a reply."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.common import batching, training_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tunelab.config import Experiment
    from tunelab.data import Split
    from tunelab.methods.base import TrainerInputs
    from tunelab.templates import Encoded


def sampling_arguments(inputs: TrainerInputs, held_out: str) -> tuple[list[dict], list[dict] | None, dict]:
    """What the trainers that sample their own replies (GRPO, distill) are given alike: the train and eval prompts,
    and their configs' arguments (TrainingArguments', the template's variables, the sampling's shared settings)."""
    from tunelab.templates import template_vars

    exp, tokenizer = inputs.exp, inputs.tokenizer
    train_rows = prompt_rows(exp, inputs.splits.train, tokenizer)
    eval_rows = prompt_rows(exp, inputs.splits.eval, tokenizer) if inputs.splits.eval else None
    batches = batching(exp.train, exp.method)
    args = training_arguments(exp.train, inputs.hw, inputs.output_dir, eval_rows is not None, batches, held_out)
    args |= dict(
        include_num_input_tokens_seen="no",  # their batches hold prompt and completion ids, not input_ids
        chat_template_kwargs=template_vars(exp.tokenizer, tokenizer) or None,
        # Dropout would give a reply other log-probs in the update than at sampling (and in GRPO's reference); TRL's
        # DPO turns it off by default, its GRPO and distillation do not.
        disable_dropout=True,
        shuffle_dataset=True,
        log_completions=False,
    )
    return train_rows, eval_rows, args


def prompt_rows(exp: Experiment, split: Split, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """A split's prompts as TRL's sampling trainers take them: the system prompt folded where the template has no
    place for it, and the template's reads (a row's other fields stay, for GRPO's rewards)."""
    from tunelab.templates import fold_preference, preference_as_template_reads

    fold = exp.tokenizer.fold_system
    return [preference_as_template_reads(fold_preference(r, fold), tokenizer) for r in split.rows]


def check_prompt_room(exp: Experiment, encoded: list[Encoded], completion: int, key: str) -> None:
    """Every prompt leaves room for a whole completion of `completion` tokens (`key`: the setting) within
    train.max_length: TRL samples after the whole prompt, never truncating it, so a longer one would make a longer
    sequence than plan's memory estimate counts."""
    from tunelab.errors import ConfigError

    room = exp.train.max_length - completion
    for enc in encoded:
        lengths = enc.lengths()
        longer = [enc.origins[i] for i in range(len(lengths)) if lengths[i] > room]
        if longer:
            raise ConfigError(
                f"train.max_length: {len(longer)} prompts ({', '.join(longer[:3])}{', ...' if len(longer) > 3 else ''})"
                f" leave less than {key}={completion} tokens for the completion within "
                f"train.max_length={exp.train.max_length}; raise train.max_length to "
                f"{int(lengths.max()) + completion}, or shorten those prompts"
            )
