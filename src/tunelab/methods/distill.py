"""On-policy distillation: prompts and a teacher model -> TRL's DistillationTrainer. The student samples a reply to
each prompt itself, and learns the teacher's next-token distribution at every token of that reply (a divergence
between the two distributions over the whole vocabulary, not a sampled token's log-probability), so the teacher
corrects the mistakes the student actually makes.

train.batch_size counts prompts (one reply each). The held-out measure is the eval loss: the same divergence on
replies sampled for the eval prompts, which train.keep: best and early_stop follow (lower is better). The teacher
is frozen and loaded beside the student (plan counts it); it must share the student's tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import (
    batching,
    check_prompt_room,
    instantiate,
    prompt_rows,
    training_arguments,
    trl_config,
)

if TYPE_CHECKING:
    from trl import DistillationTrainer

    from tunelab.config import Experiment
    from tunelab.templates import Encoded


def build(inputs: TrainerInputs) -> DistillationTrainer:
    from trl import DistillationConfig, DistillationTrainer

    from tunelab.teacher import load_teacher, resolve_teacher
    from tunelab.templates import template_vars

    exp, settings, tokenizer = inputs.exp, inputs.exp.distill, inputs.tokenizer
    assert settings is not None
    train_rows = prompt_rows(exp, inputs.splits.train, tokenizer)
    eval_rows = prompt_rows(exp, inputs.splits.eval, tokenizer) if inputs.splits.eval else None
    has_eval, batches = eval_rows is not None, batching(exp.train, exp.method)
    args = training_arguments(exp.train, inputs.hw, inputs.output_dir, has_eval, batches, METHOD.held_out)
    args["include_num_input_tokens_seen"] = "no"  # its batches hold prompt and completion ids, not input_ids
    config = trl_config(
        DistillationConfig,
        **args,
        beta=settings.beta,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
        chat_template_kwargs=template_vars(exp.tokenizer, tokenizer) or None,
        # Dropout would make the distribution the student is scored by another than the one it sampled from.
        disable_dropout=True,
        shuffle_dataset=True,
        log_completions=False,
    )
    teacher = load_teacher(resolve_teacher(exp), inputs.hw.device)
    return instantiate(
        DistillationTrainer,
        inputs.model,
        config,
        tokenizer,
        train_rows,
        eval_rows,
        inputs.callbacks,
        teacher_model=teacher,
    )


def check_data(exp: Experiment, encoded: list[Encoded]) -> None:
    assert exp.distill is not None
    check_prompt_room(exp, encoded, exp.distill.max_completion_length, "distill.max_completion_length")


def describe(exp: Experiment) -> str:
    d = exp.distill
    from tunelab.teacher import short_name

    assert d is not None
    divergence = "reverse KL" if d.beta == 1 else "forward KL" if d.beta == 0 else f"generalized JSD (beta {d.beta:g})"
    dropout = "; dropout off" if exp.scope.lora is not None and exp.scope.lora.dropout else ""
    return (
        f"distill: one reply sampled per prompt, up to {d.max_completion_length} tokens at temperature "
        f"{d.temperature:g}; every reply token scored by the {divergence} to teacher {short_name(d.teacher)}{dropout}"
    )


METHOD = Method(
    name="distill",
    formats=("prompt",),
    sequences=1,  # the student's forward over prompt and reply (the teacher's, under no_grad, keeps nothing)
    reference=False,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.distill,
    generates=True,
    check_data=check_data,
    describe=describe,
)
