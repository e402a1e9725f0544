"""The experiment schema, loading from YAML, and `--set` overrides.

Everything a user writes is validated here, once; the rest of tunelab only sees typed objects.
Every field carries its description, which feeds `tunelab schema` and the reference docs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.errors import ConfigError, TunelabError, did_you_mean

LAYER_WORDS = ("all", "last-half", "first-half")
# A run name is one path component: no separators, no leading dot, nothing a terminal renderer interprets.
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
MAX_EXPERIMENT_BYTES = 1_000_000
MAX_YAML_VALUES = 100_000  # after alias expansion; a real experiment has a few hundred
TARGET_PRESETS = ("qv", "qkvo", "attention", "mlp", "all-linear")
BUILTIN_PREFIX = "builtin:"


def inline_template(setting: str) -> bool:
    """Whether tokenizer.chat_template holds a Jinja template itself rather than naming one."""
    return "{{" in setting or "{%" in setting


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
    SHORT_KEY: ClassVar[str | None] = None  # settings given as one value stand for {SHORT_KEY: value}

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, value: Any) -> Any:
        return short_form(cls, value) if cls.SHORT_KEY and isinstance(value, (str, list)) else value


class LastN(Strict):
    last: int = Field(gt=0, description="Select the last N decoder layers.")


class FirstN(Strict):
    first: int = Field(gt=0, description="Select the first N decoder layers.")


def _check_layer_selection(value: Any) -> Any:
    """Give one clear message for every malformed layer selection instead of one per union member."""
    if isinstance(value, str) and value in LAYER_WORDS:
        return value
    if isinstance(value, dict) and len(value) == 1 and set(value) <= {"last", "first"}:
        ((word, n),) = value.items()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{{{word}: N}} takes a number of layers N of at least 1, not {n!r}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list) and value:
        for item in value:
            ok_int = isinstance(item, int) and not isinstance(item, bool) and item >= 0
            ok_range = isinstance(item, str) and re.fullmatch(r"\d+\s*-\s*\d+", item) is not None
            if not (ok_int or ok_range):
                raise ValueError(f"layer item {item!r} is neither an index (0, 1, ...) nor a range like '5-7'")
        return value
    raise ValueError(
        f"{value!r} is not a layer selection; use all | last-half | first-half | {{last: N}} | {{first: N}} "
        "| a list of indices and ranges like [0, 1, '5-7']"
    )


LayerSelection = Annotated[
    Literal["all", "last-half", "first-half"] | LastN | FirstN | list[int | str],
    BeforeValidator(_check_layer_selection),
]


def _on_off(value: Any) -> Any:
    # YAML 1.1 reads a bare on/off/yes/no as a boolean.
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]


class Quantization(Strict):
    bits: Literal[4, 8] = Field(
        description="4: QLoRA (bitsandbytes 4-bit weights); 8: bitsandbytes LLM.int8() weights. The linear layers of "
        "the decoder are quantized; embeddings, norms and lm_head keep their precision."
    )
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4.")
    double_quant: bool = Field(
        default=True, description="4-bit: quantize the quantization constants too (about 0.4 bits a parameter less)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="4-bit: the dtype the dequantized weights compute in; auto follows model.dtype's choice.",
    )

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return f"4-bit {self.type}" + (" double-quant" if self.double_quant else "")


class ModelSettings(Strict):
    SHORT_KEY: ClassVar[str] = "id"  # `model: org/name` is `model: {id: org/name}`

    id: str = Field(
        description="Base model: a hub id (org/name), a local folder with config.json, or builtin:tiny-chat."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to load.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weight dtype. auto: bfloat16 on GPUs that support it, float16 on other GPUs, "
        "float32 on CPU and MPS.",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        default="auto", description="Where to train. auto picks cuda, then mps, then cpu."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = Field(
        default=None, description="Attention kernel; None lets Transformers choose (usually sdpa)."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run modelling code shipped with the checkpoint. Off unless you trust it."
    )
    quantization: Quantization | None = Field(
        default=None,
        description="Load the base quantized with bitsandbytes (QLoRA and 8-bit LoRA); LoRA scopes only. Needs "
        "the bitsandbytes package (pip install tunelab[quantization]).",
    )


class TokenizerSettings(Strict):
    id: str | None = Field(default=None, description="Tokenizer to load; defaults to the model's own.")
    chat_template: str | None = Field(
        default=None,
        description="Chat template: None keeps the tokenizer's own (the usual choice), 'builtin:llama3' names a "
        "built-in one, 'trl:<name>' one of TRL's (e.g. trl:qwen3_training, its training version of Qwen3's), "
        "Jinja text ({% ... %}, {{ ... }}) is the template itself, anything else is a path to a .jinja file.",
    )
    pad_token: str | None = Field(
        default=None,
        description="Padding token. None keeps the tokenizer's; if it has none (Llama-3.x, Mistral), tunelab picks "
        "one that is neither EOS nor the turn terminator (e.g. <|finetune_right_pad_id|>, <unk>) and plan shows it.",
    )
    fold_system: bool = Field(
        default=False,
        description="Put a conversation's system message at the start of its first user turn, for templates "
        "that have no system role (Gemma) or move it (Mistral); plan shows the result.",
    )
    template_vars: dict[str, str | bool | int | float] = Field(
        default_factory=dict,
        description="Variables the chat template reads, passed wherever tunelab renders it (training, plan, "
        "compare): e.g. {enable_thinking: false} for Qwen3, {date_string: '02 Dec 2026'} for Llama 3.x. A "
        "template that reads date_string gets '26 Jul 2024' unless it is set here, so an experiment renders the "
        "same tokens on any day.",
    )


READ_FIELDS = Literal[  # the record fields tunelab reads, which data.columns may rename a dataset's fields to
    "messages",
    "conversations",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "label",
    "text",
    "instruction",
    "input",
    "output",
    "system",
    "tools",
    "solution",  # GRPO: the field TRL's accuracy rewards check a completion against
]


class DataSource(Strict):
    """One source of data.train or data.eval with settings of its own: a part of it, its split, its field names."""

    SHORT_KEY: ClassVar[str] = "path"  # a source given as its path alone

    path: str = Field(description="A .jsonl/.json/.csv/.parquet file, a `datasets` folder or a hub dataset id.")
    split: str | None = Field(
        default=None,
        description="Its split, for a folder or hub dataset (default: data.hub_split; for data.eval, data.eval_split).",
    )
    subset: str | None = Field(
        default=None,
        description="Its subset (the dataset's config), for a folder or hub dataset with several (default: "
        "data.subset).",
    )
    rows: int | None = Field(
        default=None, gt=0, description="Take a random sample of this many of its rows, drawn with train.seed."
    )
    fraction: float | None = Field(
        default=None, gt=0, le=1, description="Take a random part of its rows, drawn with train.seed."
    )
    columns: dict[str, READ_FIELDS] | None = Field(
        default=None, description="Rename its fields as data.columns does (default: data.columns)."
    )

    @model_validator(mode="after")
    def _one_part(self) -> DataSource:
        if self.rows is not None and self.fraction is not None:
            raise ValueError("set either rows or fraction, not both")
        return self

    def sample_size(self, available: int) -> int | None:
        """How many of `available` rows to draw; None: take them all."""
        if self.rows is not None:
            return self.rows
        return max(1, round(available * self.fraction)) if self.fraction is not None else None


def _kind_of_source(value: Any) -> str:
    return "[source]" if isinstance(value, dict | DataSource) else "[path]"


def _one_or_many(value: Any) -> str:
    return "[many]" if isinstance(value, list) else "[one]"


# A path or a {path, rows, ...} mapping: a discriminator picks the form, so a mistake in one is reported in its own
# words, not as every form's error (the bracketed tags drop out of the key an error names).
Source = Annotated[
    Annotated[str, Tag("[path]")] | Annotated[DataSource, Tag("[source]")], Discriminator(_kind_of_source)
]
Sources = Annotated[
    Annotated[Source, Tag("[one]")] | Annotated[list[Source], Tag("[many]")], Discriminator(_one_or_many)
]


class DataSettings(Strict):
    SHORT_KEY: ClassVar[str] = "train"  # `data: f.jsonl` (or a list of sources) is `data: {train: f.jsonl}`

    train: Sources = Field(
        description="Training data: .jsonl/.json/.csv/.parquet file(s), a `datasets` folder, or a hub dataset id; "
        "or {path, rows or fraction, split, subset, columns} for a random part of one, each source on its own (a "
        "mixture)."
    )
    eval: Source | None = Field(
        default=None,
        description="Held-out data in the same formats as `train`; {path, rows: 500} evaluates on a sample of it.",
    )
    eval_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Hold out this fraction of `train` for evaluation instead: whole prompts, every row of a prompt "
        "(and every copy of a row) on one side.",
    )
    eval_also: dict[Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,39}$")], Source] = Field(
        default_factory=dict,
        description="More held-out sets by name (SFT), each scored beside the eval data at every evaluation as "
        "eval_<name>_loss: e.g. {general: {path: HuggingFaceH4/ultrachat_200k, split: test_sft, rows: 300}} shows what "
        "the tuning costs the model on chats unlike yours.",
    )
    format: Literal[
        "auto", "messages", "conversations", "prompt_completion", "text", "alpaca", "preference", "unpaired", "prompt"
    ] = Field(default="auto", description="Record format; auto detects it from the first record's fields.")
    subset: str | None = Field(
        default=None,
        description="The subset (config) of a hub dataset or folder that has several, as the hub names them: main "
        "for openai/gsm8k.",
    )
    hub_split: str = Field(
        default="train",
        description="Split of `train` to read when it is a hub dataset id or a folder (a dataset repository's files, "
        "or one saved with `save_to_disk`).",
    )
    revision: str | None = Field(
        default=None,
        description="Revision (branch, tag or commit) of the hub datasets to read, so a rerun reads the same rows "
        "after the dataset's owner changes it; None reads the newest.",
    )
    eval_split: str | None = Field(
        default=None,
        description="Split of `eval` to read when it is a hub dataset id or a folder (e.g. test_sft); default: "
        "hub_split, which is refused when `eval` is the same dataset as `train`.",
    )
    columns: dict[str, READ_FIELDS] = Field(
        default_factory=dict,
        description="Rename the dataset's fields to the ones tunelab reads, before its format is detected: e.g. "
        "{question: prompt, answer: completion} for GSM8K, {problem: prompt, solution: completion} for MATH.",
    )
    loss_on: Literal["replies", "all"] = Field(
        default="replies",
        description="SFT: the tokens that carry loss. replies: each assistant reply and the token that ends its turn "
        "(a completion, for prompt/completion rows); all: every token, prompts and template included, as TRL's "
        "SFTTrainer trains chat rows by default (assistant_only_loss off).",
    )
    as_chat: bool = Field(
        default=False,
        description="Train plain-text rows in the chat format: each string prompt becomes a user turn (after the "
        "row's `system` text, if it has one) and each string completion, chosen or rejected answer the assistant's "
        "reply, rendered by the chat template. Off: strings train as the raw text they are (TRL's standard format).",
    )
    merge_consecutive_turns: bool = Field(
        default=False,
        description="Join consecutive messages of the same role into one (a blank line between), for templates "
        "that require user/assistant turns to alternate.",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _some_files(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list; give at least one data file")
        return value

    @field_validator("eval_also")
    @classmethod
    def _not_the_eval_data(cls, value: dict) -> dict:
        if "eval" in value:
            raise ValueError("'eval' names the eval data (its loss is eval_loss); name this set otherwise")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSettings:
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set either eval or eval_fraction, not both")
        return self

    @property
    def train_sources(self) -> list[DataSource]:
        """data.train's sources, each with its split and columns settled."""
        return [self.settled(s) for s in (self.train if isinstance(self.train, list) else [self.train])]

    @property
    def eval_source(self) -> DataSource | None:
        return self.settled(self.eval, held_out=True) if self.eval is not None else None

    @property
    def train_files(self) -> list[str]:
        return [s.path for s in self.train_sources]

    def settled(self, source: str | DataSource, held_out: bool = False) -> DataSource:
        """`source` with the split, subset and columns these settings give it where it names none; `held_out`: it is
        held-out data, data.eval or one of data.eval_also's (whose default split is eval_split)."""
        split = (self.eval_split if held_out else None) or self.hub_split
        if isinstance(source, str):
            return DataSource(path=source, split=split, columns=self.columns, subset=self.subset)
        columns = self.columns if source.columns is None else source.columns
        return source.model_copy(
            update={"split": source.split or split, "columns": columns, "subset": source.subset or self.subset}
        )


# TRL 1.16's DPO losses (it checks them only at the first step, so tunelab checks them here).
DPO_LOSSES = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class DPOSettings(Strict):
    beta: float = Field(default=0.1, gt=0, description="Strength of the KL pull towards the reference model.")
    loss_type: DPO_LOSSES | list[DPO_LOSSES] = Field(
        default="sigmoid", description="TRL DPO loss type(s): sigmoid, ipo, hinge, robust, ... (a list combines them)."
    )
    reference: Literal["auto", "live", "precomputed"] = Field(
        default="auto",
        description="How the reference model's log-probabilities are obtained. live: computed each step (for LoRA, "
        "the base with the adapter disabled, no second copy; otherwise a frozen second copy). precomputed: once, "
        "before training, then no reference model in memory. auto: live for LoRA, precomputed otherwise.",
    )


class KTOSettings(Strict):
    beta: float = Field(default=0.1, gt=0, description="Strength of the KL pull towards the reference model.")
    desirable_weight: float = Field(
        default=1.0, gt=0, description="Weight of thumbs-up examples; raise it when they are fewer than thumbs-down."
    )
    undesirable_weight: float = Field(default=1.0, gt=0, description="Weight of thumbs-down examples.")
    reference: Literal["auto", "live", "precomputed"] = Field(
        default="auto", description="How the reference model's log-probabilities are obtained (as for DPO)."
    )


class ORPOSettings(Strict):
    beta: float = Field(
        default=0.1, gt=0, description="Weight of the odds-ratio term against the SFT loss (lambda in the paper)."
    )


class SimPOSettings(Strict):
    beta: float = Field(default=2.0, gt=0, description="Scale of the length-normalised reward (the paper's beta).")
    gamma: float = Field(
        default=0.5, ge=0, description="Target reward margin between chosen and rejected (TRL's simpo_gamma)."
    )


GRPO_LOSSES = Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo"]


class GRPOSettings(Strict):
    rewards: list[str] = Field(
        min_length=1,
        description="Reward functions, each `file.py:function` (relative to the experiment file; called as TRL calls "
        "them: prompts, completions and the row's other columns as keyword arguments, returning one float per "
        "completion), `trl:<name>`, one of TRL's (trl:think_format_reward, trl:accuracy_reward, ...), or a reward "
        "model that scores each prompt and completion: a completed tunelab run of method: reward (e.g. runs/reward) "
        "or a published one, `model:<hub id or folder>` (a ...ForSequenceClassification checkpoint with one label).",
    )
    reward_weights: list[float] | None = Field(
        default=None, description="Weight of each reward in the total (default: 1 each)."
    )
    reward_quantization: Quantization | None = Field(
        default=None,
        description="Load the published reward models among the rewards (model:<hub id or folder>) quantized by "
        "bitsandbytes (bits: 4 or 8), so a reward model as large as the policy fits beside it; its score head is not "
        "quantized. A reward run scores as it trained: export it with --merge and name model:<that folder>.",
    )
    generations: int = Field(
        default=8, ge=2, description="Completions sampled per prompt; each is scored against its group's mean."
    )
    max_completion_length: int = Field(default=256, gt=0, description="Longest completion sampled, in tokens.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the completions.")
    beta: float = Field(
        default=0.0,
        ge=0,
        description="KL pull towards the starting model; 0 (TRL's default) keeps no reference model. For LoRA the "
        "reference is a frozen copy of the starting adapter; otherwise a second copy of the base.",
    )
    loss_type: GRPO_LOSSES = Field(
        default="dapo", description="TRL's loss aggregation: dapo (its default), grpo, dr_grpo, bnpo, cispo or sapo."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="Divide advantages by the group's reward std (group), the batch's, or not."
    )
    iterations: int = Field(
        default=1,
        ge=1,
        description="Optimizer steps on each batch of sampled replies (TRL's num_iterations, the paper's mu); each "
        "epoch then takes that many times the steps.",
    )
    epsilon: float = Field(default=0.2, gt=0, description="Clipping range of the policy ratio, below and above.")
    epsilon_high: float | None = Field(
        default=None, gt=0, description="Upper clipping bound when it differs (DAPO's clip-higher: 0.28)."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of the completions.")
    mask_truncated: bool = Field(
        default=False,
        description="Leave completions cut at max_completion_length out of the loss (TRL's "
        "mask_truncated_completions; DAPO recommends it).",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        default="token",
        description="Policy ratios per token (GRPO), or one per reply from its mean log-probability (sequence: GSPO, "
        "as Qwen3 was trained; TRL pairs it with loss_type grpo and a much smaller epsilon, e.g. 3e-4 / 4e-4).",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="Python functions a reply may call while it is sampled, each `file.py:function` (relative to "
        "the experiment file), with type hints and a Google-style docstring: TRL prints their descriptions into "
        "every prompt through the chat template, runs each call the reply makes and lets it go on after the result "
        "(the results carry no loss). Needs chat prompts and a template TRL parses calls from (Llama 3.1/3.2, "
        "Qwen2.5/3/3.5, gpt-oss, GLM-4.5, Gemma 4, ...).",
    )
    environment: str | None = Field(
        default=None,
        description="A class each reply acts in while it is sampled, `file.py:Class` (relative to the experiment "
        "file; TRL's environment_factory, experimental in TRL 1.x): one instance a reply, its `reset(**row)` called "
        "first with the prompt row's fields (a string it returns is appended to the last user message), its public "
        "methods the tools the reply may call (type hints and Google-style docstrings, as grpo.tools; their state "
        "is the instance's), and an optional `get_reward()` that scores the reply from that state (a reward beside "
        "grpo.rewards, weight 1, logged under the class's name). Needs what grpo.tools needs.",
    )
    tool_rounds: int | None = Field(
        default=None,
        ge=1,
        description="How many times a reply may call tools and go on with their results (TRL's "
        "max_tool_calling_iterations); default: until it answers without a call or reaches max_completion_length.",
    )

    @property
    def acting(self) -> list[str]:
        """What a reply's calls run: grpo.tools and grpo.environment, as named (hashed and kept with the run)."""
        return [*self.tools, *([self.environment] if self.environment else [])]


class DistillSettings(Strict):
    teacher: str = Field(
        description="The model whose next-token distributions the student learns, on replies the student samples "
        "itself (on-policy distillation): a hub id, a local folder (relative to this file), builtin:tiny-chat, or a "
        "completed tunelab run (its trained model). It must share the student's vocabulary (tokenizer)."
    )
    teacher_revision: str | None = Field(default=None, description="Hub revision of the teacher (a hub id's).")
    teacher_quantization: Quantization | None = Field(
        default=None,
        description="Load the teacher quantized by bitsandbytes (bits: 4 or 8), so a larger teacher fits beside the "
        "student; its output head is not quantized. For a hub id or a model folder (a run teacher loads as it "
        "trained: export it with --merge first).",
    )
    beta: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="The divergence: 1 reverse KL (the student's own mass, mode-seeking; TRL's default and the "
        "usual on-policy distillation), 0 forward KL (the teacher's mass, mode-covering), between them the "
        "generalized Jensen-Shannon divergence (0.5: JSD).",
    )
    max_completion_length: int = Field(default=256, gt=0, description="Longest reply sampled, in tokens.")
    temperature: float = Field(
        default=1.0, gt=0, description="Sampling temperature of the replies, and of both distributions in the loss."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of the replies.")


class RewardSettings(Strict):
    center_rewards: float | None = Field(
        default=None,
        ge=0,
        description="Weight of a penalty on the squared mean score of each pair, which keeps the scores centred on 0 "
        "(TRL's center_rewards_coefficient; 0.01 in the paper that introduced it). Scores centred on 0 mean the same "
        "across prompts, as a reward for GRPO wants.",
    )


# Methods whose model scores a whole sequence with one number (AutoModelForSequenceClassification, num_labels=1)
# rather than predicting the next token: their base model gets a new score head in place of lm_head.
SCORING_METHODS = ("reward",)


def model_head(method: str) -> str:
    """The head a method's model carries: "lm" (next-token logits, every method that generates) or "score" (one number
    a sequence: a reward model)."""
    return "score" if method in SCORING_METHODS else "lm"


LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "olora", "eva")  # and pissa_niter_N


def known_lora_init(value: object) -> bool:
    """Whether scope.lora.init takes `value` (PEFT's init_lora_weights strings that tunelab runs)."""
    return isinstance(value, str) and (value in LORA_INITS or re.fullmatch(r"pissa_niter_[0-9]+", value) is not None)


def init_moves_base(init: str) -> bool:
    """PiSSA and OLoRA move the adapter's start out of the frozen weights (W = W_res + BA at step 0), and their
    adapter is saved converted to plain LoRA of rank 2r."""
    return init.startswith("pissa") or init == "olora"


class LoraScope(Strict):
    r: int = Field(default=16, gt=0, le=65536, description="LoRA rank: the capacity of the update.")
    alpha: float = Field(
        default=32,
        gt=0,
        description="LoRA scaling (lora_alpha); the update is scaled by alpha/r (alpha/sqrt(r) with rslora).",
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field(
        default="none", description="Which bias terms train too (PEFT's `bias`)."
    )
    task_type: Literal["CAUSAL_LM"] = Field(default="CAUSAL_LM", description="PEFT task type.")
    targets: str | list[str] = Field(
        default="all-linear",
        description="Where LoRA attaches: a preset (qv, qkvo, attention, mlp, all-linear), a list of module "
        "names (e.g. [q_proj, v_proj]), or a regular expression matched against full module names.",
    )
    parameters: list[str] = Field(
        default_factory=list,
        description="Weights outside linear layers that LoRA trains too (PEFT's target_parameters), matched against "
        "the end of full parameter names in the chosen layers: e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] "
        "for gpt-oss's fused experts, which all-linear does not reach there. Trained without dropout.",
    )
    layers: LayerSelection = Field(
        default="all",
        description="Which decoder layers get LoRA: all | last-half | first-half | {last: N} | {first: N} "
        "| [indices or 'a-b' ranges].",
    )
    layers_pattern: str | None = Field(
        default=None, description="Name of the decoder-layer list (e.g. 'layers', 'h'); detected when None."
    )
    dora: bool = Field(
        default=False,
        description="DoRA (PEFT's use_dora): each adapted weight is split into a direction, updated by LoRA, and a "
        "trained magnitude per output feature. Slower per step than plain LoRA; not on fused MoE expert weights.",
    )
    rslora: bool = Field(
        default=False,
        description="Rank-stabilised LoRA (PEFT's use_rslora): scale the update by alpha/sqrt(r) instead of alpha/r, "
        "so a higher rank does not shrink it.",
    )
    open: list[Literal["norm", "lm_head", "embeddings"]] = Field(
        default_factory=list,
        description="Original modules that train whole beside the adapter and are saved with it (PEFT's "
        "modules_to_save): norm (the final norm), lm_head, embeddings. Where lm_head is tied to the embeddings, "
        "opening either opens the one shared tensor.",
    )
    init: str = Field(
        default="default",
        description="How the adapter starts (PEFT's init_lora_weights): default (B zero, A random: the update starts "
        "at 0), gaussian, orthogonal (even r), or pissa / olora, which start the adapter from the weights' principal "
        "components (PiSSA: SVD; OLoRA: QR) and take them out of the frozen weights. pissa computes a full SVD of "
        "each adapted weight when the model loads (minutes on a 7B model); pissa_niter_16 (a fast SVD of 16 "
        "iterations) takes seconds. A pissa or olora run's adapter is saved converted to plain LoRA of rank 2r on "
        "the original weights (PEFT's path_initial_model_for_weight_conversion), so compare, eval and export use it "
        "on the base as it is. eva (SFT) starts each A from the top-r right singular vectors of its layer's inputs on "
        "the training batches, B at zero (PEFT's EVA: forward passes before the first step, until the components "
        "settle); every layer keeps rank r, so plan's counts hold and the adapter is plain LoRA.",
    )
    loraplus_ratio: float | None = Field(
        default=None,
        ge=1,
        le=1e4,
        allow_inf_nan=False,
        description="LoRA+ (PEFT's create_loraplus_optimizer): the B matrices learn at train.learning_rate times "
        "this ratio, the A matrices at train.learning_rate (the paper's ratio: 16, with a learning rate about half "
        "of plain LoRA's). One-dimensional tensors (biases, DoRA magnitudes, an opened norm) learn at B's rate, as "
        "PEFT groups them. The optimizer stays train.optimizer.",
    )
    tokens: list[str] = Field(
        default_factory=list,
        description="Tokens whose embedding and lm_head rows train beside the adapter, the rest frozen (PEFT's "
        "trainable_token_indices): for tokens the base never trained, such as a chat template's special tokens on a "
        "base (not instruct) model; `train` names the ones it finds.",
    )

    @field_validator("init", mode="before")
    @classmethod
    def _known_init(cls, value: Any) -> Any:
        if value is True:  # PEFT's own spelling of its default
            return "default"
        if known_lora_init(value):
            return value
        why = (
            " (it needs a pass over the data or a quantized base before training, which tunelab does not run yet)"
            if value in ("corda", "loftq", "lora_ga")
            else ""
        )
        raise ValueError(
            f"{value!r} is not a LoRA init tunelab runs{why}; use one of {', '.join(LORA_INITS)} or pissa_niter_N"
        )

    @model_validator(mode="after")
    def _rows_or_whole(self) -> LoraScope:
        whole = sorted({"embeddings", "lm_head"} & set(self.open))
        if self.tokens and whole:
            raise ValueError(f"tokens trains rows that open: [{', '.join(whole)}] trains whole already; drop one")
        if self.init == "orthogonal" and self.r % 2:
            raise ValueError(f"init: orthogonal splits the rank in two halves, and r is {self.r}; use an even r")
        if self.moves_base:
            beside = [
                k
                for k, on in (
                    ("dora", self.dora),
                    ("open", self.open),
                    ("tokens", self.tokens),
                    ("parameters", self.parameters),
                    (f"bias: {self.bias}", self.bias != "none"),
                )
                if on
            ]
            if beside:
                raise ValueError(
                    f"init: {self.init} takes the adapter's start out of the frozen weights, and its adapter is saved "
                    f"converted to plain LoRA pairs on the original weights, which cannot carry {beside[0]}; use init: "
                    f"default with {beside[0]}, or remove {beside[0]}"
                )
        return self

    @property
    def moves_base(self) -> bool:
        return init_moves_base(self.init)


class PartialScope(Strict):
    last_blocks: int | None = Field(default=None, gt=0, description="Open the last N decoder blocks.")
    blocks: LayerSelection | None = Field(
        default=None, description="Open these decoder blocks (same forms as lora.layers)."
    )
    norm: bool = Field(default=False, description="Open the final normalisation layer (model.model.norm).")
    lm_head: bool = Field(default=False, description="Open the output head (lm_head).")
    embeddings: bool = Field(default=False, description="Open the input token embeddings.")
    patterns: list[str] = Field(
        default_factory=list, description="Also open parameters whose full name matches one of these regexes."
    )

    @model_validator(mode="after")
    def _opens_something(self) -> PartialScope:
        if self.last_blocks is not None and self.blocks is not None:
            raise ValueError("set either last_blocks or blocks, not both")
        if not (self.last_blocks or self.blocks or self.norm or self.lm_head or self.embeddings or self.patterns):
            raise ValueError("partial opens nothing; set last_blocks, blocks, norm, lm_head, embeddings or patterns")
        return self


class Scope(Strict):
    """Exactly one of lora, partial or full. `scope: full` is short for `scope: {full: true}`."""

    lora: LoraScope | None = Field(default=None, description="Train a LoRA adapter (PEFT).")
    partial: PartialScope | None = Field(default=None, description="Open some original weights, no adapter.")
    full: bool = Field(default=False, description="Train every parameter.")

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, value: Any) -> Any:
        if value == "full":
            return {"full": True}
        if value == "lora":
            return {"lora": {}}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Scope:
        chosen = [k for k, v in (("lora", self.lora), ("partial", self.partial), ("full", self.full)) if v]
        if len(chosen) != 1:
            raise ValueError(f"choose exactly one of lora, partial or full (got {chosen or 'none'})")
        return self

    @property
    def kind(self) -> Literal["lora", "partial", "full"]:
        if self.lora is not None:
            return "lora"
        if self.partial is not None:
            return "partial"
        return "full"


TRACKERS = Literal[
    "tensorboard",
    "mlflow",
    "wandb",
    "trackio",
    "comet_ml",
    "neptune",
    "clearml",
    "dvclive",
    "swanlab",
    "codecarbon",
    "azure_ml",
    "dagshub",
    "flyte",
    "kubeflow",
]
SCHEDULERS = Literal[
    "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
]


class TrainSettings(Strict):
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(default=1.0, gt=0, le=1e6, allow_inf_nan=False, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(
        default=4,
        gt=0,
        description="Examples per device in one optimizer step (times grad_accumulation); see micro_batch_size "
        "for how many go through one forward pass.",
    )
    micro_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Examples per forward pass, on average. Each step's examples are drawn at random as usual, "
        "then split into batch_size / micro_batch_size forward passes of similar length (Transformers' "
        "batch_rebalance sampler): the same examples and loss as one random batch, less padding and lower "
        "peak memory. None: 2 where batch_size is even and at least 4 (SFT), else batch_size (no split).",
    )
    grad_accumulation: int = Field(default=1, gt=0, description="Forward passes per optimizer step.")
    max_length: int = Field(
        default=1024, ge=2, le=10_000_000, description="Tokens per example; longer examples are truncated."
    )
    warmup: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Learning-rate warmup: a fraction of all steps if < 1, else a step count.",
    )
    scheduler: SCHEDULERS = Field(default="linear", description="Learning-rate schedule after warmup.")
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="Gradient clipping norm.")
    optimizer: str | None = Field(
        default=None,
        description="Transformers optimizer name (TrainingArguments.optim); None keeps Transformers' default "
        "(fused AdamW on torch >= 2.8).",
    )
    master_weights: Literal["float32", "model"] = Field(
        default="float32",
        description="The dtype trained weights are kept and updated in on a bfloat16/float16 base: float32 "
        "(mixed precision: the forward runs in the model's dtype under autocast) or the model's own, which halves "
        "their memory but loses every update smaller than half the dtype's precision at that weight (in bfloat16, "
        "most of them at a learning rate of 5e-6).",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    gradient_checkpointing: OnOffAuto = Field(
        default="auto",
        description="Recompute activations to save memory. auto: on only when the plan's estimate does not "
        "fit in the device's memory.",
    )
    compile: bool = Field(
        default=False,
        description="Compile the model with torch.compile (Transformers' torch_compile) before training: the first "
        "steps pay for compiling, later ones may run faster. Needs Triton on CUDA, a C++ compiler on CPU; not MPS.",
    )
    neftune: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="NEFTune (Transformers' neftune_noise_alpha; the paper's alpha is 5): uniform noise of at most "
        "alpha / sqrt(tokens x hidden size) on the input embeddings in training steps, none in evaluation or "
        "generation. SFT only. The tokens are a row's, so padding_free auto gives way to padded batches (in a "
        "padding-free row they would be the whole batch's, and the noise smaller).",
    )
    router_aux_loss: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Mixture-of-experts models: the weight of the router's load-balancing loss, which TRL's SFT, DPO, "
        "KTO and GRPO trainers add to the loss they train and evaluate on (their router_aux_loss_coef). Unset: the "
        "model config's own router_aux_loss_coef (0.001 for Qwen3-MoE, 0.02 for Mixtral, 0.9 for gpt-oss); 0 turns "
        "it off. plan says which applies; refused for a model without a router, a method that adds no such loss, or a "
        "model whose loss TRL cannot compute (its config declares no coefficient, or names no num_experts).",
    )
    packing: bool = Field(default=False, description="Pack several examples into one sequence (TRL packing).")
    padding_free: OnOffAuto = Field(
        default="auto",
        description="Concatenate each batch into one row without padding; position ids keep the examples apart "
        "(TRL padding_free). Same batches and loss as padded batches, no compute spent on padding. auto: on for "
        "SFT without packing or neftune (TRL's DPOTrainer has it disabled).",
    )
    group_by_length: bool = Field(
        default=False,
        description="Batch examples of similar length together instead of at random. Fast, but the batches are "
        "no longer a random mix: on the benchmark's varied chats the eval loss came out 2-6% higher at equal "
        "steps, against a 0.6% spread between seeds. Off by default.",
    )
    logging_steps: int = Field(default=10, gt=0, description="Log training metrics every N optimizer steps.")
    eval_steps: int | None = Field(
        default=None, gt=0, description="Evaluate every N steps; None evaluates at the end of each epoch."
    )
    save_steps: int | None = Field(
        default=None, gt=0, description="Checkpoint every N steps; None checkpoints at the end of each epoch."
    )
    save_minutes: float | None = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Also checkpoint once this many minutes of training have passed since the last checkpoint, so a "
        "crash loses at most that much of a long epoch; null: checkpoints only every save_steps steps or epoch.",
    )
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept for resuming.")
    keep: Literal["last", "best"] = Field(
        default="last",
        description="The weights the run keeps as its result: those of the last step, or best: the checkpoint with "
        "the lowest eval loss (a checkpoint is then written at every evaluation, and kept while it is the best). "
        "Needs eval data.",
    )
    early_stop: int | None = Field(
        default=None,
        gt=0,
        description="Stop after this many evaluations in a row without a lower eval loss (Transformers' "
        "EarlyStoppingCallback). Needs eval data; with keep: best the result is the best checkpoint.",
    )
    pin_memory: OnOffAuto = Field(default="auto", description="Pin dataloader memory. auto: on for CUDA only.")
    data_workers: int | None = Field(
        default=None,
        ge=1,
        description="Processes that tokenize the data (TRL's dataset_num_proc for preference methods); unset: one per "
        "core (this process's share under torchrun) for 20,000 rows or more, else one. The tokens are the same.",
    )
    report_to: list[TRACKERS] = Field(
        default_factory=list,
        description="Experiment trackers (Transformers' report_to): tensorboard, mlflow, wandb, trackio, ...; the "
        "tracker's package must be installed.",
    )


class OutputSettings(Strict):
    dir: str = Field(default="runs", description="Folder that holds run directories.")
    name: str | None = Field(
        default=None,
        pattern=RUN_NAME,
        description="Run directory name (letters, digits, '.', '_', '-'; up to 100); defaults to the experiment name.",
    )


class DistributedSettings(Strict):
    accelerate_config: str | None = Field(
        default=None,
        description="An accelerate config file (from `accelerate config`: FSDP, DeepSpeed ZeRO, multi-GPU), relative "
        "to this file. `tunelab train` then launches through `accelerate launch --config_file` with it.",
    )


METHODS = Literal[
    "sft", "dpo", "kto", "orpo", "simpo", "grpo", "distill", "reward"
]  # tunelab.methods.REGISTRY holds each one's code
METHOD_SECTIONS = {
    "dpo": DPOSettings,
    "kto": KTOSettings,
    "orpo": ORPOSettings,
    "simpo": SimPOSettings,
    "grpo": GRPOSettings,
    "distill": DistillSettings,
    "reward": RewardSettings,
}


class Experiment(Strict):
    name: str = Field(pattern=RUN_NAME, description="Experiment name; names the run directory.")
    model: ModelSettings = Field(description="The base model.")
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings, description="Tokenizer and template.")
    data: DataSettings = Field(description="Training and evaluation data.")
    method: METHODS = Field(
        default="sft",
        description="Objective: sft (demonstrations), dpo, kto, orpo or simpo (preferences; orpo and simpo keep no "
        "reference model, kto also takes unpaired thumbs-up/down data), or grpo (prompts, and reward functions that "
        "score sampled completions), or distill (prompts, and a teacher model whose next-token distributions the "
        "student learns on its own sampled replies), or reward (preference pairs: a reward model, the base with a "
        "score head that rates a whole reply, trained to rate the chosen answer above the rejected one).",
    )
    dpo: DPOSettings | None = Field(default=None, description="DPO settings (method: dpo).")
    kto: KTOSettings | None = Field(default=None, description="KTO settings (method: kto).")
    orpo: ORPOSettings | None = Field(default=None, description="ORPO settings (method: orpo).")
    simpo: SimPOSettings | None = Field(default=None, description="SimPO settings (method: simpo).")
    grpo: GRPOSettings | None = Field(default=None, description="GRPO settings (method: grpo): rewards, sampling.")
    distill: DistillSettings | None = Field(
        default=None, description="Distillation settings (method: distill): the teacher, the divergence, sampling."
    )
    reward: RewardSettings | None = Field(default=None, description="Reward model settings (method: reward).")
    scope: Scope = Field(default_factory=lambda: Scope(lora=LoraScope()), description="What trains.")
    init_from: str | None = Field(
        default=None,
        description="Start from a completed run (e.g. runs/sft-quickstart): its LoRA adapter keeps training (with "
        "its own settings), or its trained tensors are put on the base. The run must share this experiment's base "
        "model and scope kind. A LoRA scope may also start from a PEFT adapter folder saved by a plain script.",
    )
    train: TrainSettings = Field(default_factory=TrainSettings, description="The training rhythm.")
    output: OutputSettings = Field(default_factory=OutputSettings, description="Where runs go.")
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings, description="How several processes train (default: DDP via --nproc)."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Experiment:
        for name, defaults in METHOD_SECTIONS.items():
            if getattr(self, name) is not None and self.method != name:
                raise ValueError(
                    f"a {name} section is set but method is {self.method}; set method: {name} or remove the section"
                )
            if self.method == name and getattr(self, name) is None:
                if name == "grpo":
                    raise ValueError(
                        "grpo: method grpo learns from reward functions, and none is named; add "
                        "grpo: {rewards: [rewards.py:my_reward]}"
                    )
                if name == "distill":
                    raise ValueError(
                        "distill: method distill learns from a teacher model, and none is named; add "
                        "distill: {teacher: <hub id, model folder or tunelab run>}"
                    )
                setattr(self, name, defaults())
        if self.grpo is not None:
            self._check_grpo(self.grpo)
        if self.distill is not None and self.distill.max_completion_length >= self.train.max_length:
            raise ValueError(
                f"distill.max_completion_length: {self.distill.max_completion_length} leaves no room for the prompt "
                f"within train.max_length={self.train.max_length}; lower it or raise train.max_length"
            )
        if self.method in SCORING_METHODS:
            self._check_scoring()
        micro = self.train.micro_batch_size
        if micro is not None and micro != self.train.batch_size:
            if self.method != "sft" or self.train.packing or self.train.group_by_length:
                raise ValueError(
                    "train.micro_batch_size: splitting batches applies to SFT without packing or group_by_length; "
                    "remove it"
                )
            if self.train.batch_size % micro:
                raise ValueError(
                    f"train.micro_batch_size: {micro} does not divide train.batch_size={self.train.batch_size}; "
                    "use a divisor"
                )
        if self.data.eval_also and self.method != "sft":
            raise ValueError(
                f"data.eval_also: TRL's {self.method.upper()} trainer scores one held-out set; data.eval_also applies "
                "to SFT: remove it"
            )
        if self.data.eval_also and not (self.data.eval or self.data.eval_fraction):
            raise ValueError(
                "data.eval_also: scores beside the eval data, and there is none; set data.eval (a file) or "
                "data.eval_fraction (e.g. 0.05)"
            )
        if self.method != "sft" and self.data.loss_on != "replies":
            raise ValueError(
                f"data.loss_on: {self.method.upper()} scores the chosen and rejected answers, not every token; "
                "data.loss_on applies to SFT: remove it"
            )
        for key in ("packing", "group_by_length"):
            if self.method != "sft" and getattr(self.train, key):
                raise ValueError(
                    f"train.{key}: applies to SFT; TRL's {self.method.upper()} trainer draws its batches itself and "
                    "would ignore it: remove it"
                )
        if self.method != "sft" and self.train.neftune is not None:
            raise ValueError(
                f"train.neftune: applies to SFT; in {self.method.upper()} the noise would reach the log-probabilities "
                "it compares: remove it"
            )
        if self.method != "sft" and self.train.padding_free == "on":
            raise ValueError(
                f"train.padding_free: TRL's {self.method.upper()} trainer has no padding-free batches; set it to auto "
                "or off"
            )
        if self.model.quantization is not None and self.scope.kind != "lora":
            raise ValueError(
                f"model.quantization: a quantized base cannot train a {self.scope.kind} scope (its weights are packed "
                "integers that take no gradient); use scope: lora, or remove model.quantization"
            )
        lora = self.scope.lora
        if lora is not None and lora.moves_base and self.model.quantization is not None:
            raise ValueError(
                f"scope.lora.init: {lora.init} on a quantized base would take the adapter's start out of weights "
                "already rounded to 4 or 8 bits (PEFT's PiSSA-QLoRA recipe quantizes the residual after the init, "
                "which tunelab does not do yet); use init: default, or remove model.quantization"
            )
        if lora is not None and lora.init == "eva" and self.method != "sft":
            raise ValueError(
                f"scope.lora.init: eva starts the adapter from the inputs its layers see on SFT batches, and "
                f"{self.method} trains on batches of another kind; use init: eva in the SFT run and init_from that "
                "run, or use init: default"
            )
        if lora is not None and lora.moves_base and self.method in SCORING_METHODS:
            raise ValueError(
                f"scope.lora.init: {lora.init} saves its adapter converted to plain LoRA pairs, which cannot carry "
                f"the {self.method} model's new score head; use init: default"
            )
        t = self.train
        compares = "train.keep: best" if t.keep == "best" else "train.early_stop" if t.early_stop else None
        if compares and not (self.data.eval or self.data.eval_fraction or self.data.eval_split):
            raise ValueError(
                f"{compares}: compares evaluations, and there is no eval data; set data.eval (a file), "
                "data.eval_fraction (e.g. 0.05) or data.eval_split"
            )
        if t.keep == "best" and t.save_steps and t.eval_steps and t.save_steps % t.eval_steps:
            raise ValueError(
                f"train.keep: best keeps the checkpoint of the best evaluation, so checkpoints must fall on "
                f"evaluations: make train.save_steps ({t.save_steps}) a multiple of train.eval_steps ({t.eval_steps})"
            )
        if self.method == "kto" and self.train.batch_size < 2:
            raise ValueError(
                "train.batch_size: KTO estimates its KL term from other examples of a batch; use 2 or more"
            )
        return self

    def _check_scoring(self) -> None:
        """A reward model has no lm_head: its new score head trains in every scope, and a scope that opens lm_head asks
        for something it does not have."""
        lora, partial = self.scope.lora, self.scope.partial
        asks = (
            "scope.lora.open: lm_head" if lora is not None and "lm_head" in lora.open
            else "scope.partial.lm_head" if partial is not None and partial.lm_head
            else None
        )  # fmt: skip
        if asks:
            raise ValueError(
                f"{asks}: a reward model has no lm_head (a new score head, which always trains, rates the reply); "
                "remove it"
            )

    def _check_grpo(self, grpo: GRPOSettings) -> None:
        t = self.train
        if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.rewards):
            raise ValueError(
                f"grpo.reward_weights: {len(grpo.reward_weights)} weights for {len(grpo.rewards)} rewards; give one "
                "weight per reward"
            )
        if t.batch_size % grpo.generations:
            fits = max(grpo.generations, t.batch_size - t.batch_size % grpo.generations)
            raise ValueError(
                f"train.batch_size: GRPO scores each prompt's {grpo.generations} completions (grpo.generations) "
                f"against each other, so a batch holds whole groups of them; {t.batch_size} is not a multiple of "
                f"{grpo.generations}: set train.batch_size: {fits}"
            )
        if grpo.max_completion_length >= t.max_length:
            raise ValueError(
                f"grpo.max_completion_length: {grpo.max_completion_length} leaves no room for the prompt within "
                f"train.max_length={t.max_length}; lower it or raise train.max_length"
            )
        if self.data.loss_on != "replies":
            raise ValueError("data.loss_on: GRPO scores sampled completions, not the data's tokens; remove it")
        if grpo.tool_rounds is not None and not grpo.tools and grpo.environment is None:
            raise ValueError(
                "grpo.tool_rounds: no tool is named in grpo.tools, and no grpo.environment; name them, or remove it"
            )
        if grpo.beta and self.init_from and self.scope.kind != "lora":
            raise ValueError(
                f"grpo.beta: {grpo.beta:g} pulls towards a reference that TRL reloads from the base model, not from "
                f"init_from's run, for a {self.scope.kind} scope (for LoRA it copies the starting adapter); set "
                "grpo.beta: 0, or train from the base"
            )

    @property
    def steps_per_sampling(self) -> int:
        """Optimizer steps that train on one batch of sampled replies (GRPO's iterations). TRL keeps that batch in
        memory only, so a run resumes to the same weights only from a checkpoint between two such batches."""
        return self.grpo.iterations if self.method == "grpo" and self.grpo is not None else 1

    @property
    def run_name(self) -> str:
        return self.output.name or self.name

    def config_hash(self) -> str:
        settings = self.model_dump(mode="json")
        # Settings added after runs existed stay out of the hash while at their default, so those runs keep their
        # hash: resume and studies still recognise them.
        for *parents, key in LATER_SETTINGS:
            section = settings
            for name in parents:
                section = section.get(name) if isinstance(section, dict) else None
            if isinstance(section, dict) and section.get(key) == LATER_SETTINGS[(*parents, key)]:
                del section[key]
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


LATER_SETTINGS: dict[tuple[str, ...], Any] = {  # each added setting's path in the experiment and its default
    ("data", "eval_split"): None,
    ("data", "as_chat"): False,
    ("data", "revision"): None,
    ("data", "columns"): {},
    ("data", "loss_on"): "replies",
    ("data", "subset"): None,
    ("data", "eval_also"): {},
    ("train", "compile"): False,
    ("train", "neftune"): None,
    ("train", "master_weights"): "float32",
    ("train", "data_workers"): None,
    ("train", "keep"): "last",
    ("train", "early_stop"): None,
    ("train", "save_minutes"): 30.0,
    ("train", "router_aux_loss"): None,
    ("model", "quantization"): None,
    ("grpo",): None,
    ("distill",): None,
    ("reward",): None,
    ("tokenizer", "template_vars"): {},
    ("scope", "lora", "dora"): False,
    ("scope", "lora", "rslora"): False,
    ("scope", "lora", "open"): [],
    ("scope", "lora", "tokens"): [],
    ("scope", "lora", "parameters"): [],
    ("scope", "lora", "init"): "default",
    ("scope", "lora", "loraplus_ratio"): None,
}


# ---------------------------------------------------------------- loading


def load_experiment(path: str | Path, overrides: list[str] | None = None, run_name: str | None = None) -> Experiment:
    """Read, override and validate an experiment file; relative paths resolve against its folder.

    `run_name` (the CLI's --name) is taken as it is written, never parsed as YAML.
    """
    path = Path(path)
    raw, lines = read_yaml(path)
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    if run_name is not None:
        check_run_name(run_name, "--name")
        set_key(raw, "output.name", run_name, where="--name")
    # A value given on the command line is reported there, not at a line of the file (--name is checked above, by
    # the same pattern as output.name's).
    given = {item.partition("=")[0].strip(): f"--set {item.partition('=')[0].strip()}" for item in overrides or []}
    exp = validate(raw, source=str(path), lines=lines, given=given)
    return resolve_paths(exp, path.parent)


def check_run_name(name: str, where: str) -> None:
    if not re.fullmatch(RUN_NAME, name):
        raise TunelabError(
            f"{where}: {name!r} is not a run name; use letters, digits, '.', '_' and '-' (up to 100, "
            "starting with a letter or digit), with no path separators"
        )


def read_yaml(path: Path) -> tuple[dict, dict[tuple[str, ...], int]]:
    """A YAML mapping and the line of each of its keys."""
    if not path.is_file():
        raise TunelabError(f"{path}: file not found")
    if path.stat().st_size > MAX_EXPERIMENT_BYTES:
        raise TunelabError(f"{path}: {path.stat().st_size} bytes is too large for an experiment file (at most 1 MB)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TunelabError(f"{path}: not a UTF-8 text file (byte {e.start}); an experiment file is YAML text") from e
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_nodes(root, path)
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as e:  # a character YAML text may not hold: a position, not a line
        line = text.count("\n", 0, e.position) + 1
        raise TunelabError(
            f"{path}:{line}: not valid YAML (character #x{e.character:04x}: {e.reason}); remove it"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise TunelabError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TunelabError(f"{path}: expected a mapping of keys (name, model, data, ...)")
    return raw, _line_map(root)


def _check_nodes(root: yaml.Node | None, path: Path) -> None:
    """Refuse duplicate keys (YAML keeps the last one silently) and alias bombs (values that expand without bound)."""
    expanded: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in expanded:
            return expanded[id(node)]
        expanded[id(node)] = 1  # a cycle counts once
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # "<<" merges, and may repeat
                    if key.value in seen:
                        raise TunelabError(
                            f"{path}:{key.start_mark.line + 1}: key '{key.value}' is written twice (first on line "
                            f"{seen[key.value]}); keep one"
                        )
                    seen[key.value] = key.start_mark.line + 1
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        expanded[id(node)] = total
        if total > MAX_YAML_VALUES:
            raise TunelabError(
                f"{path}:{node.start_mark.line + 1}: expands to more than {MAX_YAML_VALUES} values "
                "(nested YAML aliases?); write the values out"
            )
        return total

    if root is not None:
        size(root)


def validate(
    raw: dict, source: str, lines: dict[tuple[str, ...], int] | None = None, given: dict[str, str] | None = None
) -> Experiment:
    """Validate a raw experiment; `given` maps keys set on the command line to how they were given."""
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        raise TunelabError(_one_line(e, source, lines or {}, given or {})) from e


def _one_line(error: ValidationError, source: str, lines: dict[tuple[str, ...], int], given: dict[str, str]) -> str:
    first = error.errors()[0]
    loc = tuple(str(p) for p in first["loc"])
    # Pydantic adds union-member tags such as 'list[union[int,str]]' to the location; drop them.
    loc = tuple(p for p in loc if not re.search(r"[\[\]]", p) and p != "str")
    where = source + (f":{_nearest_line(loc, lines)}" if lines else "")
    dotted = ".".join(loc)
    for key, label in given.items():
        if dotted == key or dotted.startswith(key + "."):
            where = label
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        return f"{where}: unknown key '{key}'{unknown_key_hint(loc[-1], fields)}"
    if first["type"] == "missing":
        return f"{where}: missing required key '{key}'"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        msg = f"{first['input']!r} is not a choice; {msg[0].lower()}{msg[1:]}"
    if first["type"] == "model_type" and (cls := _class_at(loc)) is not None:  # pydantic names its own class
        alone = f", or its {cls.SHORT_KEY} alone" if getattr(cls, "SHORT_KEY", None) else ""
        msg = f"expected a mapping of its settings ({', '.join(cls.model_fields)}){alone}"
    if where.startswith("--") or not key:  # "--set train.seed: ..." already names the key
        return f"{where}: {msg}"
    return f"{where}: {key}: {msg}"


def _nearest_line(loc: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _line_map(root: yaml.Node | None) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to the 1-based line where its key is written.

    An aliased node is walked once, at its anchor: its keys are written there.
    """
    found: dict[tuple[str, ...], int] = {}
    walked: set[int] = set()

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = (*prefix, str(key_node.value))
                found[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[(*prefix, str(i))] = item.start_mark.line + 1
                walk(item, (*prefix, str(i)))

    if root is not None:
        walk(root, ())
    return found


# ---------------------------------------------------------------- overrides


def model_class(annotation: Any) -> type[BaseModel] | None:
    """The settings class inside a field's annotation (`LoraScope | None` -> LoraScope), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = model_class(arg) if get_origin(arg) is not list else None
        if found is not None:
            return found
    return None


def _class_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings class a key's value is read as (None for a plain value or an unknown key)."""
    cls: type[BaseModel] | None = Experiment
    for part in loc:
        if cls is None or part not in cls.model_fields:
            return None
        cls = model_class(cls.model_fields[part].annotation)
    return cls


# The names the libraries' own configs give settings that an experiment file names otherwise: a training script's
# LoraConfig, TrainingArguments and from_pretrained arguments, carried over as they were, are answered with the key,
# and `tunelab init --from-script` reads a script's by them.
class LibraryName(NamedTuple):
    whose: str
    key: str  # the experiment file's key
    value: Any = None  # the value that key takes for the library's True (bf16: bfloat16); None: the same value
    note: str = ""


PEFT, ARGS, MODEL = "PEFT's LoraConfig", "Transformers' TrainingArguments", "TRL's ModelConfig"
GRPO = "TRL's GRPOConfig"
ARGS_4, SFT_0, LOAD_4 = "Transformers 4's TrainingArguments", "TRL 0.x's SFTConfig", "Transformers 4's from_pretrained"
WARMUP = "a fraction below 1, else steps"
LIBRARY_NAMES: dict[str, LibraryName] = {
    "lora_alpha": LibraryName(PEFT, "scope.lora.alpha"),
    "lora_dropout": LibraryName(PEFT, "scope.lora.dropout"),
    "target_modules": LibraryName(PEFT, "scope.lora.targets"),
    "layers_to_transform": LibraryName(PEFT, "scope.lora.layers"),
    "modules_to_save": LibraryName(PEFT, "scope.lora.open"),
    "use_dora": LibraryName(PEFT, "scope.lora.dora"),
    "use_rslora": LibraryName(PEFT, "scope.lora.rslora"),
    "trainable_token_indices": LibraryName(PEFT, "scope.lora.tokens"),
    "init_lora_weights": LibraryName(PEFT, "scope.lora.init", "default"),
    "loraplus_lr_ratio": LibraryName("PEFT's create_loraplus_optimizer", "scope.lora.loraplus_ratio"),
    "num_train_epochs": LibraryName(ARGS, "train.epochs"),
    "per_device_train_batch_size": LibraryName(
        ARGS, "train.batch_size", note="times train.grad_accumulation a step, as there"
    ),
    "gradient_accumulation_steps": LibraryName(ARGS, "train.grad_accumulation"),
    "warmup_ratio": LibraryName(ARGS_4, "train.warmup", note=WARMUP),
    "warmup_steps": LibraryName(ARGS, "train.warmup", note=WARMUP),
    "lr_scheduler_type": LibraryName(ARGS, "train.scheduler"),
    "optim": LibraryName(ARGS, "train.optimizer"),
    "output_dir": LibraryName(ARGS, "output.dir"),
    "dataloader_pin_memory": LibraryName(ARGS, "train.pin_memory"),
    "dataloader_num_workers": LibraryName(ARGS, "train.data_workers"),
    "bf16": LibraryName(ARGS, "model.dtype", "bfloat16"),
    "fp16": LibraryName(ARGS, "model.dtype", "float16"),
    "torch_compile": LibraryName(ARGS, "train.compile"),
    "neftune_noise_alpha": LibraryName(ARGS, "train.neftune"),
    "router_aux_loss_coef": LibraryName("TRL's SFTConfig", "train.router_aux_loss"),
    "max_seq_length": LibraryName(SFT_0, "train.max_length"),
    "torch_dtype": LibraryName(LOAD_4, "model.dtype"),
    "model_name_or_path": LibraryName(MODEL, "model.id"),
    "lr": LibraryName("PyTorch's optimizers'", "train.learning_rate"),
    "num_generations": LibraryName(GRPO, "grpo.generations"),
    "num_iterations": LibraryName(GRPO, "grpo.iterations"),
    "mask_truncated_completions": LibraryName(GRPO, "grpo.mask_truncated"),
    "max_tool_calling_iterations": LibraryName(GRPO, "grpo.tool_rounds"),
}


def unknown_key_hint(name: str, fields: list[str]) -> str:
    """What follows "unknown key 'x'": the key a library's own name for a setting is here, or the closest key."""
    if name in LIBRARY_NAMES:
        whose, key, value, note = LIBRARY_NAMES[name]
        said = key + (f": {value}" if value is not None else "") + (f" ({note})" if note else "")
        return f" ({whose} name); in an experiment file it is {said}"
    return did_you_mean(name, fields)


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    cls = _class_at(loc)
    return list(cls.model_fields) if cls else []


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML and typed by the schema."""
    if "=" not in item:
        raise TunelabError(f"--set {item}: expected KEY=VALUE, e.g. --set train.learning_rate=5e-6")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise TunelabError(f"--set {key}: value {text!r} is not valid YAML") from e
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        # YAML 1.1 reads on/off/yes/no as booleans; on a command line they are words (--set output.name=on).
        # Boolean settings still take them: the schema reads "on" and "yes" as true.
        value = text.strip()
    set_key(raw, key.strip(), value, where=f"--set {key}")


def short_form(cls: type[BaseModel] | None, value: Any) -> dict:
    """The mapping a settings value given in short stands for: `model: org/name` {id: org/name}, `data: f.jsonl` (or
    a list) {train: ...}, a data source's path {path: ...}, `scope: full` {full: true}; nothing else: {}."""
    key = getattr(cls, "SHORT_KEY", None)
    if key and isinstance(value, (str, list)):
        return {key: value}
    return {value: True} if isinstance(value, str) else {}


def set_key(raw: dict, key: str, value: Any, where: str) -> None:
    """Set a dotted key in a raw experiment mapping, after checking the key exists in the schema."""
    parts = key.split(".")
    cls: type[BaseModel] | None = Experiment
    classes = []  # the settings class each part of the key opens
    for i, part in enumerate(parts):
        if cls is None:
            raise TunelabError(f"{where}: '{'.'.join(parts[:i])}' has no sub-keys")
        if part not in cls.model_fields:
            raise TunelabError(f"{where}: unknown key '{part}'{unknown_key_hint(part, list(cls.model_fields))}")
        cls = model_class(cls.model_fields[part].annotation)
        classes.append(cls)
    node = raw
    for part, opens in zip(parts[:-1], classes, strict=False):
        child = node.get(part)
        if not isinstance(child, dict):
            child = short_form(opens, child)
            node[part] = child
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- paths


def _local(path: str, base: Path, key: str) -> str:
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        return str(candidate.resolve()) if candidate.exists() else path
    except OSError as e:  # a name longer than the file system holds, a folder on the way that cannot be read
        shown = path if len(path) <= 80 else f"{path[:40]}...{path[-30:]}"
        raise ConfigError(f"{key}: cannot look up '{shown}' ({e.strerror}); check the path") from e


def _local_reward(spec: str, base: Path, key: str = "grpo.rewards") -> str:
    """`file.py:function` with the file made absolute, a reward model's run folder too where it is there; TRL's
    rewards (`trl:name`) stay as they are. `key`: the setting that names it (grpo.rewards, grpo.tools)."""
    file, sep, function = spec.rpartition(":")
    if spec.startswith("trl:"):
        return spec
    if spec.startswith("model:"):  # a published reward model: its folder, where it is one
        return "model:" + _local(spec.removeprefix("model:"), base, key)
    if not sep:
        return _local(spec, base, key)
    return f"{_local(file, base, key)}:{function}"


def _local_source(source: str | DataSource, base: Path, key: str) -> str | DataSource:
    if isinstance(source, str):
        return _local(source, base, key)
    return source.model_copy(update={"path": _local(source.path, base, key)})


def resolve_paths(exp: Experiment, base: Path) -> Experiment:
    """Turn inputs given relative to the experiment file into absolute paths.

    Hub ids and builtin: names stay as they are; output.dir stays relative to the working directory.
    """
    update: dict[str, Any] = {}
    if not exp.model.id.startswith(BUILTIN_PREFIX):
        update["model"] = exp.model.model_copy(update={"id": _local(exp.model.id, base, "model.id")})
    tok = exp.tokenizer
    tok_update = {}
    if tok.id is not None:
        tok_update["id"] = _local(tok.id, base, "tokenizer.id")
    named = tok.chat_template is not None and not inline_template(tok.chat_template)
    if named and not tok.chat_template.startswith((BUILTIN_PREFIX, "trl:")):
        tok_update["chat_template"] = _local(tok.chat_template, base, "tokenizer.chat_template")
    if tok_update:
        update["tokenizer"] = tok.model_copy(update=tok_update)
    data = exp.data
    train = [
        _local_source(s, base, "data.train") for s in (data.train if isinstance(data.train, list) else [data.train])
    ]
    update["data"] = data.model_copy(
        update={
            "train": train if isinstance(data.train, list) else train[0],
            "eval": _local_source(data.eval, base, "data.eval") if data.eval else None,
            "eval_also": {
                name: _local_source(source, base, f"data.eval_also.{name}") for name, source in data.eval_also.items()
            },
        }
    )
    if exp.init_from is not None:
        update["init_from"] = _local(exp.init_from, base, "init_from")
    if exp.grpo is not None:
        update["grpo"] = exp.grpo.model_copy(
            update={
                "rewards": [_local_reward(r, base) for r in exp.grpo.rewards],
                "tools": [_local_reward(t, base, "grpo.tools") for t in exp.grpo.tools],
                "environment": _local_reward(exp.grpo.environment, base, "grpo.environment")
                if exp.grpo.environment
                else None,
            }
        )
    if exp.distill is not None and not exp.distill.teacher.startswith(BUILTIN_PREFIX):
        update["distill"] = exp.distill.model_copy(
            update={"teacher": _local(exp.distill.teacher, base, "distill.teacher")}
        )
    if exp.distributed.accelerate_config is not None:
        update["distributed"] = DistributedSettings(
            accelerate_config=_local(exp.distributed.accelerate_config, base, "distributed.accelerate_config")
        )
    return exp.model_copy(update=update)


def json_schema() -> dict:
    """Experiment files' JSON Schema (for editors), with the short forms the loader takes beside each section's
    mapping: `model: org/name`, `data: f.jsonl` (or a list), `scope: full` (or lora)."""
    schema = Experiment.model_json_schema()
    defs, properties = schema["$defs"], schema["properties"]
    for name, field in Experiment.model_fields.items():
        cls = model_class(field.annotation)
        alone = getattr(cls, "SHORT_KEY", None)
        if cls is not None and (alone or cls is Scope):
            short = {"enum": ["full", "lora"]} if cls is Scope else defs[cls.__name__]["properties"][alone]
            short = {k: v for k, v in short.items() if k not in ("description", "title")}
            section = properties[name]
            properties[name] = {"anyOf": [short, {"$ref": section.pop("$ref")}], **section}
    return schema
