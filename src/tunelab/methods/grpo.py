"""GRPO: prompts and reward functions -> TRL's GRPOTrainer (online: it samples completions and learns from their
rewards, each scored against the other completions of its prompt).

train.batch_size counts completions, so a batch holds batch_size / grpo.generations prompts; an epoch samples
grpo.generations completions of every prompt. The held-out measure is the mean reward of completions sampled for
the eval prompts (eval_reward), which train.keep: best and early_stop follow (higher is better). With grpo.beta > 0
TRL keeps the reference itself: a frozen copy of the starting adapter (LoRA: the fresh one, or the one init_from
continues), or the base reloaded from its path (partial and full scopes, so not with init_from).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.online import check_prompt_room, sampling_arguments

if TYPE_CHECKING:
    from trl import GRPOTrainer

    from tunelab.config import Experiment
    from tunelab.templates import Encoded


def build(inputs: TrainerInputs) -> GRPOTrainer:
    from trl import GRPOConfig, GRPOTrainer

    from tunelab.rewards import load_rewards

    settings = inputs.exp.grpo
    assert settings is not None
    train_rows, eval_rows, args = sampling_arguments(inputs, METHOD.held_out)
    config = trl_config(
        GRPOConfig,
        **args,
        num_generations=settings.generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        loss_type=settings.loss_type,
        scale_rewards=settings.scale_rewards,
        reward_weights=settings.reward_weights,
        num_iterations=settings.iterations,
        epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high,
        top_p=settings.top_p,
        mask_truncated_completions=settings.mask_truncated,
    )
    rewards = load_rewards(settings.rewards, settings.reward_quantization)
    return instantiate(
        GRPOTrainer, inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks,
        reward_funcs=rewards,
    )  # fmt: skip


def check_data(exp: Experiment, encoded: list[Encoded]) -> None:
    """The rewards exist (read, not run), and every prompt leaves room for a whole completion."""
    from tunelab.rewards import check_rewards

    assert exp.grpo is not None
    check_rewards(exp.grpo.rewards, exp.grpo.reward_quantization)
    check_prompt_room(exp, encoded, exp.grpo.max_completion_length, "grpo.max_completion_length")


def describe(exp: Experiment) -> str:
    g = exp.grpo
    assert g is not None
    weights = g.reward_weights or [1.0] * len(g.rewards)
    rewards = " + ".join(
        f"{w:g} x {Path(r).name if not r.startswith('trl:') else r}" for w, r in zip(weights, g.rewards, strict=True)
    )
    prompts = exp.train.batch_size * exp.train.grad_accumulation // g.generations
    reference = f"KL to the starting model, beta {g.beta:g}" if g.beta else "no reference model (beta 0)"
    dropout = "; dropout off" if exp.scope.lora is not None and exp.scope.lora.dropout else ""
    return (
        f"GRPO: {g.generations} replies sampled per prompt ({prompts} prompts a step), up to "
        f"{g.max_completion_length} tokens at temperature {g.temperature:g}; reward {rewards}; loss {g.loss_type}; "
        f"{reference}{dropout}"
    )


def _keeps_reference(exp: Experiment) -> bool:
    return exp.grpo is not None and exp.grpo.beta > 0


METHOD = Method(
    name="grpo",
    formats=("prompt",),
    sequences=1,  # a batch's completions, each prompt and completion in one sequence
    reference=_keeps_reference,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.grpo,
    fused_head=True,
    generates=True,
    samples=lambda exp: exp.grpo.generations * exp.grpo.iterations if exp.grpo else 1,
    held_out="reward",
    check_data=check_data,
    describe=describe,
)
