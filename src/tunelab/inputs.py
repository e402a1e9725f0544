"""Everything one command reads for an experiment, read once: `plan` and `train` work over the same `Inputs`.

The data files (hashed from the same bytes that are parsed), the model's config, the tokenizer, the
accelerate config, and the data as the tokenizer encodes it, with the checks on those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Experiment
from tunelab.data import Split, Splits, as_sft_row, load_splits
from tunelab.distributed import Engine, read_engine
from tunelab.errors import ConfigError
from tunelab.templates import (
    Encoded,
    TemplateRowError,
    TokenChecks,
    check_tokens,
    encode,
    reads_the_clock,
    template_vars,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

PLAN_ROWS = 2000  # rows `plan` alone tokenizes of a split, spread over it, for its statistics; training tokenizes all
PARALLEL_ROWS = 20_000  # from here a split is tokenized in several processes (starting them takes a few seconds)


@dataclass
class Inputs:
    exp: Experiment
    engine: Engine | None
    config: PretrainedConfig
    splits: Splits
    tokenizer: PreTrainedTokenizerBase | None  # None: plan on a bare config.json, without tokenizer files
    encoded: list[Encoded]  # train, then eval when there is one, as training tokenizes them
    checks: TokenChecks | None
    complete: bool  # every row was tokenized (what training needs), not only PLAN_ROWS of them (spread)
    also: dict[str, Encoded] = field(default_factory=dict)  # data.eval_also's sets, tokenized


def encode_split(exp: Experiment, tokenizer, split: Split, limit: int | None = None, fmt: str | None = None) -> Encoded:
    """A split as `train` tokenizes it (preference pairs as prompt + chosen answer, GRPO's prompts with an empty
    reply); `fmt`: the data's format."""
    picked = spread(len(split.rows), limit)
    rows, origins = [split.rows[i] for i in picked], [split.origins[i] for i in picked]
    variables = template_vars(exp.tokenizer, tokenizer)
    workers = data_workers(len(rows), exp.train.data_workers)
    settings = (exp.tokenizer.fold_system, variables, workers, exp.data.loss_on)
    if fmt == "prompt" and exp.grpo is not None and (exp.grpo.tools or exp.grpo.environment):
        from tunelab.methods.grpo import check_tool_template

        # what a template lacks for replies that call tools, named by the setting (before encode names a row)
        check_tool_template(tokenizer, "grpo.tools" if exp.grpo.tools else "grpo.environment")
        rows = with_tools(rows, origins, exp.grpo.tools, exp.grpo.environment)
    try:
        return encode(tokenizer, [as_sft_row(r, fmt) for r in rows], origins, *settings)
    except TemplateRowError:
        if fmt != "prompt":
            raise
        # GRPO samples after the generation prompt and supervises no written-out reply, so a template whose
        # generation prompt opens a block no written-out reply has (a reasoning model's '<think>') serves it: its
        # prompts are measured as sampling continues them, without an empty reply's end.
        sampled = [{"prompt": r["prompt"], "sample": True, "tools": r.get("tools")} for r in rows]
        return encode(tokenizer, sampled, origins, *settings)


def spread(rows: int, limit: int | None) -> range | list[int]:
    """The indices of the rows plan tokenizes of a split of `rows`: every row up to `limit`, else `limit` rows spread
    evenly over the split from its first (a file sorted by length or by source is read along its whole length)."""
    if limit is None or rows <= limit:
        return range(rows)
    return [i * rows // limit for i in range(limit)]


def with_tools(rows: list[dict], origins: list[str], tools: list[str], environment: str | None) -> list[dict]:
    """GRPO's prompts as TRL renders them when replies may call `tools` (grpo.tools) or the methods of an
    `environment` (grpo.environment): each with their descriptions, the tools' first, which the chat template prints
    into it. A reply calls tools in a chat, so each prompt must be one."""
    from tunelab.rewards import shown_tools

    schemas = shown_tools(tools, environment)
    key = "grpo.tools" if tools else "grpo.environment"
    for row, origin in zip(rows, origins, strict=True):
        if isinstance(row["prompt"], str):
            raise ConfigError(
                f"{origin}: the prompt is plain text, and {key} has replies call tools, which happens in a chat; "
                "give prompts as messages ([{role: user, content: ...}]) or set data.as_chat: true"
            )
    return [row | {"tools": schemas} for row in rows]


def data_workers(rows: int, setting: int | None = None) -> int:
    """Processes to tokenize `rows` rows in: train.data_workers where set, else one under PARALLEL_ROWS and
    encode_workers() from there."""
    if setting is not None:
        return setting
    return encode_workers() if rows >= PARALLEL_ROWS else 1


def encode_workers() -> int:
    """Processes to tokenize in: this process's share of the cores it may run on (under torchrun, every process of
    the machine tokenizes the data, so each takes cores / LOCAL_WORLD_SIZE)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def read_inputs(exp: Experiment, training: bool = False, engine: Engine | None = None) -> Inputs:
    """Read the experiment's inputs. `training`: the tokenizer must exist and every row is tokenized.
    `engine`: the accelerate config, when the caller has read it already."""
    from tunelab.models import (
        check_stored_quantization,
        check_weight_files,
        has_tokenizer,
        load_config,
        load_tokenizer,
        model_path,
    )
    from tunelab.scopes import made_elsewhere

    engine = engine or read_engine(exp.distributed.accelerate_config)
    lora = exp.scope.lora
    if engine is not None and engine.sharded and lora is not None:
        splits = f"{engine.config_file.name} splits it over the processes ({engine.distributed_type})"
        instead = "or train with --nproc (DDP) instead of the accelerate config"
        if lora.moves_base:
            raise ConfigError(
                f"scope.lora.init: {lora.init}'s adapter is converted for the original weights with the whole model "
                f"at hand, and {splits}; use init: default, {instead}"
            )
        if lora.init == "eva":
            raise ConfigError(
                f"scope.lora.init: eva starts the adapter from the inputs of each adapted layer with the whole model "
                f"at hand, and {splits}; use init: default, {instead}"
            )
        if lora.loraplus_ratio:
            raise ConfigError(
                f"scope.lora.loraplus_ratio: LoRA+ builds its optimizer over the whole model's adapter before it is "
                f"wrapped, and {splits}; remove it, {instead}"
            )
    if (found := made_elsewhere(Path(model_path(exp.model.id)))) is not None:
        raise ConfigError(
            f"model.id: '{exp.model.id}' holds a trained result ({found.label}), not a model; set model.id to its "
            f"base{f' ({found.base})' if found.base else ''} and init_from: {exp.model.id} to train it further"
        )
    config = load_config(exp.model)
    check_stored_quantization(exp.model, config)
    check_weight_files(exp.model)
    splits = load_splits(exp.data, exp.method, exp.train.seed)
    tokenizer, encoded, checks, also = None, [], None, {}
    if training or exp.tokenizer.id or has_tokenizer(model_path(exp.model.id)):
        tokenizer = load_tokenizer(exp.tokenizer, exp.model, config)
        limit = None if training else PLAN_ROWS
        held = [s for s in (splits.train, splits.eval) if s is not None]
        encoded = [encode_split(exp, tokenizer, s, limit, splits.format) for s in held]
        also = {name: encode_split(exp, tokenizer, split, limit) for name, split in splits.also.items()}
        # The checks also give a tokenizer without a pad token a safe one.
        checks = check_tokens(tokenizer, encoded + list(also.values()), exp.train.max_length)
        checks.reads_clock = reads_the_clock(tokenizer, template_vars(exp.tokenizer, tokenizer))
    return Inputs(exp, engine, config, splits, tokenizer, encoded, checks, complete=training, also=also)
