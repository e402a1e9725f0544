"""GRPO: prompts and reward functions -> TRL's GRPOTrainer (online: it samples completions and learns from their
rewards, each scored against the other completions of its prompt).

train.batch_size counts completions, so a batch holds batch_size / grpo.generations prompts; an epoch samples
grpo.generations completions of every prompt. The held-out measure is the mean reward of completions sampled for
the eval prompts (eval_reward), which train.keep: best and early_stop follow (higher is better). With grpo.beta > 0
TRL keeps the reference itself: a frozen copy of the starting adapter (LoRA: the fresh one, or the one init_from
continues), or the base reloaded from its path (partial and full scopes, so not with init_from).

With grpo.tools a reply may call Python functions while it is sampled: TRL prints their descriptions into every
prompt, parses each call from the reply with the template's response parser, runs it, and lets the reply go on after
the result (up to grpo.tool_rounds times); the results' tokens carry no loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import instantiate, trl_config
from tunelab.methods.online import check_prompt_room, sampling_arguments, whole_evaluations

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from trl import GRPOTrainer

    from tunelab.config import Experiment
    from tunelab.templates import Encoded


def build(inputs: TrainerInputs) -> GRPOTrainer:
    from trl import GRPOConfig, GRPOTrainer

    from tunelab.rewards import load_environment, load_rewards, load_tools

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
        max_tool_calling_iterations=settings.tool_rounds,
        importance_sampling_level=settings.importance_sampling_level,
    )
    rewards = load_rewards(settings.rewards, settings.reward_quantization)
    tools = {"tools": load_tools(settings.tools)} if settings.tools else {}
    if settings.environment:
        tools["environment_factory"] = load_environment(settings.environment)
    return instantiate(
        whole_evaluations(GRPOTrainer), inputs.model, config, inputs.tokenizer, train_rows, eval_rows, inputs.callbacks,
        reward_funcs=rewards, **tools,
    )  # fmt: skip


def check_data(exp: Experiment, encoded: list[Encoded], tokenizer: PreTrainedTokenizerBase | None) -> None:
    """The rewards exist (read, not run) and every prompt leaves room for a whole completion (where replies call
    tools, inputs.encode_split checked the chat template prints them and TRL can read a call back)."""
    from tunelab.rewards import check_rewards

    assert exp.grpo is not None
    check_rewards(exp.grpo.rewards, exp.grpo.reward_quantization)
    check_prompt_room(exp, encoded, exp.grpo.max_completion_length, "grpo.max_completion_length")


def check_tool_template(tokenizer: PreTrainedTokenizerBase, key: str = "grpo.tools") -> None:
    """The template renders a whole tool-calling conversation (TRL's supports_tool_calling), and a reply's call can
    be parsed back: the tokenizer ships a response template, or TRL has one for this chat template."""
    import copy

    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    from tunelab.errors import ConfigError

    if not supports_tool_calling(tokenizer):
        raise ConfigError(
            f"{key}: the chat template cannot render a tool-calling conversation (tools, an assistant turn with "
            "tool_calls, a tool result); set tokenizer.chat_template to one that can, e.g. trl:qwen3 or trl:llama3_1"
        )
    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        return
    try:
        add_response_schema(copy.copy(tokenizer))
    except ValueError as e:
        raise ConfigError(
            f"{key}: TRL cannot read a tool call back from a reply in this chat template (it knows the calls "
            "of Llama 3.1/3.2, Qwen2.5/3/3.5, gpt-oss, GLM-4.5, Gemma 4, LFM2, Nemotron 3, DeepSeek-R1 distills); set "
            "tokenizer.chat_template to one of those (trl:<name>), or use a model whose tokenizer ships a "
            "response_template"
        ) from e


def describe(exp: Experiment) -> str:
    g = exp.grpo
    assert g is not None
    weights = g.reward_weights or [1.0] * len(g.rewards)
    rewards = " + ".join(
        f"{w:g} x {Path(r).name if not r.startswith('trl:') else r}" for w, r in zip(weights, g.rewards, strict=True)
    )
    prompts = exp.train.batch_size * exp.train.grad_accumulation // g.generations
    reference = f"KL to the starting model, beta {g.beta:g}" if g.beta else "no reference model (beta 0)"
    ratios = "; one policy ratio per reply (GSPO)" if g.importance_sampling_level == "sequence" else ""
    dropout = "; dropout off" if exp.scope.lora is not None and exp.scope.lora.dropout else ""
    tools = ""
    if g.tools or g.environment:
        rounds = f"up to {g.tool_rounds} rounds" if g.tool_rounds else "until it answers"
        called = ", ".join(t.rpartition(":")[2] for t in g.tools)
        acts = f"act in {g.environment.rpartition(':')[2]} (one each)" if g.environment else ""
        tools = f"; replies may {' and '.join(x for x in (f'call {called}' if called else '', acts) if x)}"
        tools += f" ({rounds}; results carry no loss)"
    return (
        f"GRPO: {g.generations} replies sampled per prompt ({prompts} prompts a step), up to "
        f"{g.max_completion_length} tokens at temperature {g.temperature:g}{tools}; reward {rewards}; loss "
        f"{g.loss_type}{ratios}; {reference}{dropout}"
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
    router_aux_loss=True,
)
