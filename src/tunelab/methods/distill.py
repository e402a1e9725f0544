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
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.online import check_prompt_room, sampling_arguments, whole_evaluations

if TYPE_CHECKING:
    from trl import DistillationTrainer

    from tunelab.config import Experiment
    from tunelab.templates import Encoded


def build(inputs: TrainerInputs) -> DistillationTrainer:
    from trl import DistillationConfig, DistillationTrainer

    from tunelab.teacher import load_teacher, resolve_teacher

    settings = inputs.exp.distill
    assert settings is not None
    train_rows, eval_rows, args = sampling_arguments(inputs, METHOD.held_out)
    config = trl_config(
        DistillationConfig,
        **args,
        beta=settings.beta,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        top_p=settings.top_p,
    )
    teacher = load_teacher(resolve_teacher(inputs.exp), inputs.hw.device)
    return instantiate(
        whole_evaluations(DistillationTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows,
        inputs.callbacks,
        teacher_model=teacher,
    )  # fmt: skip


def check_data(exp: Experiment, encoded: list[Encoded], tokenizer: object) -> None:
    assert exp.distill is not None
    check_prompt_room(exp, encoded, exp.distill.max_completion_length, "distill.max_completion_length")


def describe(exp: Experiment) -> str:
    d = exp.distill
    from tunelab.teacher import short_name

    assert d is not None
    divergence = "reverse KL" if d.beta == 1 else "forward KL" if d.beta == 0 else f"generalized JSD (beta {d.beta:g})"
    dropout = "; dropout off" if exp.scope.lora is not None and exp.scope.lora.dropout else ""
    quantized = f" ({d.teacher_quantization.describe()})" if d.teacher_quantization else ""
    return (
        f"distill: one reply sampled per prompt, up to {d.max_completion_length} tokens at temperature "
        f"{d.temperature:g}; every reply token scored by the {divergence} to teacher "
        f"{short_name(d.teacher)}{quantized}{dropout}"
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
