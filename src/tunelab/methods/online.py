"""What the methods that sample their own replies share (GRPO, distill): their prompts as TRL takes them, the
arguments their configs take alike, and the check that every prompt leaves room for a reply."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.common import batching, training_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback

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
        # TRL writes the replies sampled for the last logged step, with their rewards, beside the checkpoints
        # (checkpoints/completions/completions_<step>.parquet); nothing printed
        log_completions=True,
        num_completions_to_print=0,
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


def whole_evaluations(trainer_class: type) -> type:
    """The sampling trainer (GRPO, distill) with each evaluation's replies logged whole. TRL keeps the replies it logs
    in deques one generation batch long (the replies of the latest update, for a training step), so an evaluation's
    log held the last batch of its held-out prompts' replies only: 8 of 192 on the reward-model example. During
    `evaluate` the trainer logs into unbounded ones, and the training ones come back after it."""
    from collections import defaultdict, deque

    class WholeEvaluations(trainer_class):
        def evaluate(self, *args, **kwargs):
            kept = getattr(self, "_logs", None)
            if not isinstance(kept, dict):  # a TRL that keeps its logged replies otherwise
                return super().evaluate(*args, **kwargs)
            self._logs = {k: defaultdict(deque) if isinstance(v, defaultdict) else deque() for k, v in kept.items()}
            try:
                return super().evaluate(*args, **kwargs)
            finally:
                self._logs = kept

    WholeEvaluations.__name__ = WholeEvaluations.__qualname__ = trainer_class.__name__
    return WholeEvaluations


def rollout_keeper(written: Path, kept: Path) -> TrainerCallback:
    """Keeps the replies TRL's sampling trainers log, each under what it is. After every log, train or eval, TRL
    writes the replies sampled for it (with their rewards and advantages) to `written`/completions_<step>.parquet:
    an evaluation's replies overwrite the training replies of the step it follows, and the run's closing log writes
    the last ones again. TRL writes after the callbacks' on_log, so each on_log moves the file the log before it
    wrote into `kept` as train-<step>.parquet or eval-<step>.parquet, labelled by what that log was (kept beside
    the file, so what a crash left is labelled when the run resumes); the closing log's copy is dropped."""
    import shutil

    from transformers import TrainerCallback

    from tunelab.runs import write_atomic

    label = written / "pending"  # what the latest log was: "train" or "eval"

    def move_pending(up_to_step: int | None = None) -> None:
        kind = label.read_text() if label.is_file() else None
        for file in sorted(written.glob("completions_*.parquet")):
            step = file.stem.removeprefix("completions_")
            if kind is None or (up_to_step is not None and int(step) > up_to_step):
                file.unlink()  # unlabelled, or a step the resumed run repeats
                continue
            kept.mkdir(exist_ok=True)
            file.replace(kept / f"{kind}-{step}.parquet")
        label.unlink(missing_ok=True)

    class KeepRollouts(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                written.mkdir(parents=True, exist_ok=True)
                move_pending(state.global_step)  # a resumed run: what the log before the crash wrote

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero:
                move_pending()
                write_atomic(label, "eval" if any(k.startswith("eval_") for k in logs or {}) else "train")

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                shutil.rmtree(written, ignore_errors=True)  # the closing log's copy of the last replies

    return KeepRollouts()
