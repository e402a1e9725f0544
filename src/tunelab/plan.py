"""What will train, how many parameters, how much memory -- before any weights load.

The model is built on the meta device from its config; the scope is applied to it with the same
code `train` uses, so counts and names are exactly what training gets. Memory formulas are in
docs/memory.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Experiment, Quantization, Scope, TrainSettings, model_head
from tunelab.data import overlap_warnings
from tunelab.distributed import Engine, several_gpus
from tunelab.errors import ConfigError
from tunelab.inputs import Inputs, read_inputs
from tunelab.methods.common import Batching, batching, half_gradients_refusal, save_every
from tunelab.scope import ResolvedScope
from tunelab.templates import Encoded, TokenChecks, loss_segments

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tunelab.methods.base import Method

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CHECKPOINTING_HEADROOM = 0.9  # use at most this share of device memory before turning checkpointing on
# The tile TRL 1.16's fused LM head computes logits in: tokens by vocabulary entries (TOKEN_CHUNK_SIZE and
# _CHUNKED_LOGPROB_CHUNK_SIZE in trl/kernels/chunked_logprob.py and trl/trainer/utils.py).
FUSED_HEAD_TOKENS = 4096
FUSED_HEAD_VOCAB = 32768


@dataclass
class ModelFacts:
    id: str
    architecture: str
    layers: int
    hidden_size: int
    intermediate_size: int
    kv_dim: int
    vocab_size: int
    tied_embeddings: bool
    linear_params: int  # weights of the decoder's linear layers: what bitsandbytes quantizes (never lm_head)


@dataclass
class Memory:
    dtype: str
    tokens_per_forward: int
    activation_layers: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_checkpointed_bytes: int
    gradient_checkpointing: bool
    device: str
    device_bytes: int | None
    reference: str | None
    reference_bytes: int
    processes: int  # the processes that sharded parts are split over (1 without a sharded engine)
    sharded: list[str]  # which of weights, gradients, optimizer are split; the byte figures are per process
    total_bytes: int
    quantized: str | None = None  # how the base's linear weights are stored, when quantized
    # GRPO, distill: sampling the replies of a step at once, before training on them: their KV cache and last logits
    sampling_bytes: int = 0
    teacher: str | None = None  # distill: the frozen model beside the student, whose weights teacher_bytes counts
    teacher_bytes: int = 0
    reward_models: str | None = None  # GRPO: the reward models (reward runs, model:<id>) beside the policy, frozen
    reward_models_bytes: int = 0
    quantized_params: int = 0  # parameters stored quantized; the rest of the base is kept in float32
    master: str = "none"  # where trained weights keep a float32 master copy (methods.common.master_copy)
    optimizer_name: str | None = None  # train.optimizer; None: Transformers' default AdamW


@dataclass
class Disk:
    """The run folder at its fullest: Trainer checkpoints (the weights the Trainer saves, AdamW's state, the
    tokenizer, its small state files) and the result, against the free space where it is written."""

    checkpoint_bytes: int  # one checkpoint
    checkpoint_weights_bytes: int
    checkpoint_optimizer_bytes: int
    checkpoints: int  # the most on disk at once: save_total_limit, and the one written before the oldest goes
    timed: bool  # some of them are train.save_minutes's, beyond the Trainer's schedule
    result: str  # what the run keeps: adapter/, trained.safetensors or model/ (runs.py), with tokenizer/
    result_bytes: int
    total_bytes: int
    folder: str  # the run folder
    free_bytes: int | None  # free on its file system now (None: not measured)
    held_bytes: int  # what the run folder holds already (a run being resumed or replaced): it is reused

    @property
    def short_bytes(self) -> int:
        """What the run would lack at its fullest; 0 when it fits."""
        if self.free_bytes is None:
            return 0
        return max(0, self.total_bytes - self.held_bytes - self.free_bytes)


@dataclass
class SplitStats:
    examples: int
    measured: int
    tokens_p50: int
    tokens_p90: int
    tokens_p99: int
    tokens_max: int
    truncated: int
    loss_tokens: int
    without_loss: int = 0  # examples left with no loss token within max_length (the trainer drops them)


@dataclass
class DataStats:
    format: str
    train: SplitStats
    eval: SplitStats | None
    eval_source: str | None
    first_example: list[tuple[str, bool]] = field(default_factory=list)
    sources: str | None = None  # where the rows come from, when a source gave a sample of its rows
    also: dict[str, SplitStats] = field(default_factory=dict)  # data.eval_also's sets
    note: str | None = None
    tokens: TokenChecks | None = None
    overlap: list[str] = field(default_factory=list)  # held-out rows the run trains on, training rows that repeat


@dataclass
class Plan:
    name: str
    method: str
    model: ModelFacts
    scope: ResolvedScope
    memory: Memory
    disk: Disk
    batching: Batching
    data: DataStats | None
    warnings: list[str]
    schedule: Schedule
    method_line: str | None = None  # what the method's own settings decide (GRPO: rewards, sampling)
    router_line: str | None = None  # a mixture of experts: the load-balancing loss TRL's trainer adds, or None

    def to_json(self) -> dict:
        out = asdict(self)
        out["trainable_params"] = self.scope.trainable_params
        out["total_params"] = self.scope.total_params
        out["trainable_percent"] = round(self.scope.trainable_percent, 6)
        out["target_modules"] = self.scope.target_modules
        out["layers"] = self.scope.layers
        if self.data is not None:
            out["data"]["first_example"] = [{"text": t, "loss": loss} for t, loss in self.data.first_example]
        return out


def model_facts(model_id: str, model) -> ModelFacts:
    from tunelab.scope import find_decoder, tied_embeddings

    c = model.config.get_text_config()  # an image-text checkpoint's language model
    hidden = c.hidden_size
    heads = getattr(c, "num_attention_heads", 1)
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return ModelFacts(
        id=model_id,
        architecture=type(model).__name__,
        layers=find_decoder(model).count,
        hidden_size=hidden,
        intermediate_size=getattr(c, "intermediate_size", None) or 4 * hidden,
        kv_dim=head_dim * (getattr(c, "num_key_value_heads", None) or heads),
        vocab_size=c.vocab_size,
        tied_embeddings=tied_embeddings(model),
        linear_params=linear_params(model),
    )


def linear_params(model) -> int:
    """Parameters in the weights of nn.Linear layers other than the output head and LoRA's own: the part of the
    model Transformers' bitsandbytes integration quantizes (counted unpacked)."""
    from torch import nn

    from tunelab.models import score_head
    from tunelab.scopes import numel

    scored = score_head(model)
    head = model.get_output_embeddings() if scored is None else model.get_submodule(scored)
    return sum(
        numel(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and ".lora_" not in name
    )


def quantized_bytes_per_param(q: Quantization) -> float:
    """Bytes a quantized weight parameter takes, with its quantization constants (docs/memory.md)."""
    if q.bits == 8:
        return 1.0  # int8, plus one float32 scale per output row (under 0.1% for hidden sizes above 4096)
    # 4 bits, plus an absmax per block of 64: float32, or with double quantization one byte per block and a float32
    # per 256 blocks.
    return 0.5 + (1 / 64 + 4 / (64 * 256) if q.double_quant else 4 / 64)


def device_memory(device: str) -> int | None:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    if device == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device == "mps":  # unified memory: what Metal recommends one process's working set stays under
        return torch.mps.recommended_max_memory()
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError


# What a checkpoint or a result holds besides tensors and tokenizer, at most: RNG states, scheduler, trainer state,
# training arguments, configs, a README (about 30 KiB in a checkpoint of the built-in model, 8 KiB in an adapter;
# the trainer state grows by about 200 bytes a logged step).
SMALL_FILES = 64 * 1024
# optimizer.pt pickles each trained tensor's two moments and step counter as records of their own (about 820 bytes
# a tensor measured with torch 2.13, whatever its size).
OPTIMIZER_PER_TENSOR = 832


def estimate_disk(
    scope: ResolvedScope, exp: Experiment, memory: Memory, n_train: int, tokenizer_bytes: int, folder: Path
) -> Disk:
    """What the run writes at its fullest (docs/runs.md, "Disk"), and the free space where it writes it.

    A checkpoint holds the trained tensors (as they train: float32 master weights on a half-precision base), their
    AdamW state, the tokenizer and small files. The Trainer writes a new checkpoint before it removes the oldest
    beyond train.save_total_limit, so one more than the limit is on disk for a moment; the result is written after
    the last checkpoint, beside the ones kept.
    """
    from tunelab.runs import FULL_MODEL, folder_bytes, free_bytes
    from tunelab.scopes import get_scope

    kind = get_scope(scope.kind)
    b = DTYPE_BYTES[memory.dtype]
    trained = trained_tensor_bytes(scope, b, memory.master)
    # Checkpoints hold what trains: LoRA's adapter, partial runs' opened tensors (scopes/partial.py), the whole model
    # for full fine-tuning.
    state = optimizer_state_bytes(exp.train.optimizer, trained, scope.trainable_params)
    optimizer = state + OPTIMIZER_PER_TENSOR * len(scope.trainable_names)
    checkpoint = trained + optimizer + tokenizer_bytes + SMALL_FILES
    # Opened original weights are saved in the model's dtype, whatever their master copy's (train.py).
    saved = scope.total_params if kind.result == FULL_MODEL else scope.trainable_params
    # A PiSSA or OLoRA adapter is saved converted to plain LoRA of twice the rank (scopes/lora.py).
    adapter = trained * (2 if exp.scope.lora is not None and exp.scope.lora.moves_base else 1)
    result = (adapter if kind.adds_parameters else saved * b) + tokenizer_bytes + SMALL_FILES
    scheduled = checkpoint_saves(exp, n_train)
    # train.save_minutes may checkpoint after any step: how long a run takes is not known here, and a long one does.
    saves = optimizer_steps(exp, n_train) if exp.train.save_minutes is not None else scheduled
    # With keep: best the Trainer keeps the best checkpoint beside the newest, two at least.
    limit = max(exp.train.save_total_limit, 2) if exp.train.keep == "best" else exp.train.save_total_limit
    kept = min(limit, saves)
    at_once = min(limit + 1, saves)
    total = max(at_once * checkpoint, kept * checkpoint + result)
    held = folder_bytes(folder) if folder.is_dir() else 0  # a run resumed or replaced: its bytes are reused
    return Disk(
        checkpoint_bytes=checkpoint,
        checkpoint_weights_bytes=trained,
        checkpoint_optimizer_bytes=optimizer,
        checkpoints=at_once,
        timed=at_once > min(limit + 1, scheduled),
        result=kind.result,
        result_bytes=result,
        total_bytes=total,
        folder=str(folder),
        free_bytes=free_bytes(folder),
        held_bytes=held,
    )


def checkpoint_saves(exp: Experiment, n_train: int) -> int:
    """How many checkpoints the Trainer's schedule writes: every save_steps steps and at the last step, else every
    epoch (train.save_minutes's come on top)."""
    t = exp.train
    steps = optimizer_steps(exp, n_train)
    every = save_every(t, has_eval=True)  # keep: best needs eval data (config.py), so there is some
    if every:
        return math.ceil(steps / every)
    return math.ceil(steps / steps_per_epoch(exp, n_train))


@dataclass
class Schedule:
    """The run's optimizer steps, and when it evaluates and checkpoints (None: at each epoch's end)."""

    steps: int
    per_epoch: int
    epochs: float
    max_steps: bool  # train.max_steps set the steps
    evaluate_every: int | None
    evaluates: bool  # there are held-out data
    checkpoint_every: int | None
    checkpoint_minutes: float | None
    checkpoints_kept: int


def steps_per_epoch(exp: Experiment, n_train: int) -> int:
    from tunelab.methods import get_method

    sequences = n_train * get_method(exp.method).samples(exp)  # GRPO: each prompt's completions
    return math.ceil(sequences / (exp.train.batch_size * exp.train.grad_accumulation))


def schedule(exp: Experiment, n_train: int, evaluates: bool) -> Schedule:
    t = exp.train
    keep_best = t.keep == "best" and evaluates
    return Schedule(
        steps=optimizer_steps(exp, n_train),
        per_epoch=steps_per_epoch(exp, n_train),
        epochs=t.epochs,
        max_steps=t.max_steps is not None,
        evaluate_every=t.eval_steps or (t.save_steps if keep_best else None),
        evaluates=evaluates,
        checkpoint_every=save_every(t, evaluates),
        checkpoint_minutes=t.save_minutes,
        checkpoints_kept=max(t.save_total_limit, 2) if keep_best else t.save_total_limit,
    )


def tokenizer_bytes(tokenizer) -> int:
    """What the tokenizer takes on disk as the Trainer and the run save it (measured by saving it)."""
    import tempfile

    if tokenizer is None:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())


def disk_refusal(disk: Disk, limit: int) -> str | None:
    """The line that says the run will not fit on its disk, and how to make it fit."""
    if not disk.short_bytes:
        return None
    return (
        f"output.dir: the run writes up to {human_bytes(disk.total_bytes)} into {disk.folder} ({disk.checkpoints} "
        f"checkpoint{'s' if disk.checkpoints > 1 else ''} of {human_bytes(disk.checkpoint_bytes)} and the "
        f"{disk.result} at the end), and its disk has {human_bytes(disk.free_bytes or 0)} free: free "
        f"{human_bytes(disk.short_bytes)} there, lower train.save_total_limit (now {limit})"
        + (", set train.save_minutes: null to checkpoint only as scheduled" * disk.timed)
        + ", or set output.dir to a larger disk"
    )


def memory_warning(mem: Memory, method: str) -> str | None:
    """When the estimate is above the device's memory: by how much, its largest part, and what shrinks that part."""
    if mem.device_bytes is None or mem.total_bytes <= mem.device_bytes:
        return None
    acts = mem.activations_checkpointed_bytes if mem.gradient_checkpointing else mem.activations_bytes
    parts = {
        "weights": mem.weights_bytes,
        "optimizer state": mem.optimizer_bytes,
        "gradients": mem.gradients_bytes,
        "reference model": mem.reference_bytes,
        "teacher model": mem.teacher_bytes,
        "reward models": mem.reward_models_bytes,
        "activations": acts,
    }
    largest = max(parts, key=parts.get)
    split = "split over processes with FSDP or ZeRO (distributed.accelerate_config)"
    fewer = f"train fewer parameters (scope.lora, or fewer scope.partial.last_blocks), or {split}"
    if mem.master == "params" and mem.dtype != "float32" and not mem.quantized:
        fewer += ", or keep trained weights in the model's dtype (train.master_weights: model; loses small updates)"
    if mem.quantized:
        weights = f"a device with more memory, or the weights {split}"
    elif mem.dtype == "float32":
        weights = (
            "model.dtype: bfloat16 (half the bytes) where the device has it, "
            "or a 4-bit base under LoRA (model.quantization: {bits: 4})"
        )
    else:
        weights = f"a 4-bit base under LoRA (model.quantization: {{bits: 4}}), or the weights {split}"
    activations = "lower train.max_length or train.micro_batch_size" + (
        "" if mem.gradient_checkpointing else ", or set train.gradient_checkpointing: on"
    )
    fix = {
        "weights": weights,
        "optimizer state": fewer,
        "gradients": fewer,
        "reference model": f"{method}.reference: precomputed (log-probabilities computed once, no second model)",
        "teacher model": "a smaller teacher (distill.teacher), or model.dtype: bfloat16 where the device has it",
        "reward models": "a smaller reward model in grpo.rewards, or one trained with model.dtype: bfloat16",
        "activations": activations,
    }[largest]
    where = "this machine's memory" if mem.device == "cpu" else f"{mem.device} memory"
    each = " per process" if mem.processes > 1 else ""
    return (
        f"memory: the estimate{each} ({_gib(mem.total_bytes)}) is above {where} ({_gib(mem.device_bytes)}); its "
        f"largest part is the {largest} ({_gib(parts[largest])}): {fix}"
    )


def _activation_layers(scope: ResolvedScope, n_layers: int) -> int:
    """Layers whose activations backward needs: from the first trainable layer to the last."""
    if scope.embeddings_train:
        return n_layers
    if not scope.layers:
        return 0
    return n_layers - min(scope.layers)


# Transformers' optimizer names (TrainingArguments.optim) by the state they keep a trained weight: how many moments,
# and in what. bitsandbytes' and torchao's 8-bit states take a byte a moment and a float32 scale per block of 256.
BLOCKWISE_8BIT = 1 + 4 / 256


def optimizer_state_bytes(name: str | None, trained_bytes: int, trained_params: int) -> int:
    """The optimizer's state for the trained weights (`trained_bytes` of them as they train), by its name: AdamW's
    two moments in the weights' dtype by default (Transformers' fused AdamW)."""
    name = (name or "adamw_torch_fused").lower()
    moments = (
        0
        if "sgd" in name or "adafactor" in name
        else 3
        if "ademamix" in name
        else 1
        if any(one in name for one in ("lion", "rmsprop", "adagrad"))
        else 2
    )
    if "8bit" in name:
        return int(moments * BLOCKWISE_8BIT * trained_params)
    if "4bit" in name:
        return int(moments * (0.5 + 4 / 128) * trained_params)
    if "32bit" in name:  # bitsandbytes' paged and 32-bit optimizers keep float32 state
        return moments * 4 * trained_params
    return moments * trained_bytes


def trained_tensor_bytes(scope: ResolvedScope, param_bytes: int, master: str) -> int:
    """Bytes of the trainable tensors as they train. `master`: methods.common.master_copy's answer.

    With float32 master weights ("params") every trained tensor is float32. Otherwise PEFT still keeps adapter
    weights in float32 (autocast_adapter_dtype), while the copies of original modules trained beside them
    (scope.lora.open) and opened original weights keep the model's dtype.
    """
    from tunelab.scopes import get_scope

    if master == "params":
        return scope.trainable_params * 4
    if not get_scope(scope.kind).adds_parameters:
        return scope.trainable_params * param_bytes
    return (scope.trainable_params - scope.opened_params) * 4 + scope.opened_params * param_bytes


def master_of(exp: Experiment, device: str, dtype: str, engine: Engine | None) -> str:
    """Where this experiment keeps its trained weights' float32 master copy here (methods.common.master_copy)."""
    from tunelab.methods.common import master_copy

    quantized = exp.model.quantization is not None
    return master_copy(exp.train, quantized, device, dtype, engine.distributed_type if engine else None)


def estimate_memory(
    facts: ModelFacts,
    scope: ResolvedScope,
    exp: Experiment,
    dtype: str,
    device: str,
    engine: Engine | None = None,
    teacher: tuple[str, int] | None = None,
    reward_models: tuple[str, int] | None = None,
) -> Memory:
    """`teacher`: distill's teacher beside the student, by its label and the bytes its weights take; `reward_models`:
    GRPO's reward models beside the policy, likewise."""
    from tunelab.scopes import get_scope

    b = DTYPE_BYTES[dtype]
    adapter = get_scope(scope.kind).adds_parameters
    quantization = exp.model.quantization
    master = master_of(exp, device, dtype, engine)
    frozen = scope.total_params - scope.trainable_params
    base_params = scope.total_params - (scope.trainable_params if adapter else 0)
    trained_bytes = trained_tensor_bytes(scope, b, master)
    weights = (base_params if adapter else frozen) * b + trained_bytes
    if quantization is not None:
        # PEFT's prepare_model_for_kbit_training casts every unquantized weight (embeddings, norms, lm_head) to
        # float32; the decoder's linear weights stay packed.
        kept = base_params - facts.linear_params
        weights = int(facts.linear_params * quantized_bytes_per_param(quantization)) + kept * 4
        weights += trained_bytes
    grads = trained_bytes
    optimizer = optimizer_state_bytes(exp.train.optimizer, trained_bytes, scope.trainable_params)
    if master == "optimizer":  # DeepSpeed: float32 moments and a float32 copy of the weights
        optimizer = 12 * scope.trainable_params
    sharded = list(engine.sharded_parts) if engine else []
    processes = engine.num_processes if sharded else 1
    weights, grads, optimizer = (
        -(-part // processes) if name in sharded else part
        for name, part in (("weights", weights), ("gradients", grads), ("optimizer", optimizer))
    )
    # Tokens in one forward pass at most; DPO runs the chosen and the rejected sequence of every pair.
    from tunelab.methods import get_method
    from tunelab.methods.preference import reference_strategy

    method = get_method(exp.method)
    per_forward = batching(exp.train, exp.method).per_forward
    tokens = per_forward * exp.train.max_length * method.sequences
    reference, reference_bytes = None, 0
    if method.keeps_reference(exp):
        reference = reference_strategy(method.settings(exp), adapter)
        # adapter: TRL keeps a frozen copy of the adapter; copy: a second base model; precomputed: nothing resident.
        reference_bytes = {"adapter": grads, "copy": base_params * b, "precomputed": 0}[reference]
    h, i, kv = facts.hidden_size, facts.intermediate_size, facts.kv_dim
    per_layer = 6 * h + 2 * kv + 4 * i  # saved tensors per token in one decoder layer (SDPA, no score matrix)
    n_act = _activation_layers(scope, facts.layers)
    if method.fused_head:  # one tile of TRL's fused LM head (trl/kernels/chunked_logprob.py), forward or backward
        logits = min(tokens, FUSED_HEAD_TOKENS) * min(facts.vocab_size, FUSED_HEAD_VOCAB) * b
    elif model_head(exp.method) == "score":  # a reward model's score head: one number a token, not a vocabulary
        logits = tokens * (b + 8)
    else:
        logits = tokens * facts.vocab_size * (b + 8)  # logits, their float32 upcast and its gradient
    # DoRA keeps each adapted module's base output for the magnitude's gradient (one layer's worth when recomputed).
    dora = scope.dora_features
    # LoRA on fused expert weights merges each with its update every forward: backward keeps the merged copies and
    # builds one layer's gradient of them at a time (recomputed one layer at a time under checkpointing).
    merged_layer = -(-scope.merged_params // max(scope.merged_layers, 1))
    full_acts = tokens * (n_act * per_layer + dora) * b + logits + (scope.merged_params + merged_layer) * b
    ckpt_acts = tokens * (n_act * h + (per_layer if n_act else 0) + -(-dora // max(len(scope.layers), 1))) * b + logits
    ckpt_acts += 2 * merged_layer * b
    available = device_memory(device)
    teacher_bytes = teacher[1] if teacher else 0
    judges_bytes = reward_models[1] if reward_models else 0
    static = weights + grads + optimizer + reference_bytes + teacher_bytes + judges_bytes
    match exp.train.gradient_checkpointing:
        case "on":
            checkpointing = True
        case "off":
            checkpointing = False
        case "auto":
            checkpointing = available is not None and static + full_acts > CHECKPOINTING_HEADROOM * available
    acts = ckpt_acts if checkpointing else full_acts
    sampling = 0
    if method.generates:  # TRL samples a whole step's replies (batch x accumulation) in one generate call
        sequences = exp.train.batch_size * exp.train.grad_accumulation
        sampling = sequences * (exp.train.max_length * facts.layers * 2 * kv * b + facts.vocab_size * 4)
    return Memory(
        dtype=dtype,
        tokens_per_forward=tokens,
        activation_layers=n_act,
        weights_bytes=weights,
        gradients_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=full_acts,
        activations_checkpointed_bytes=ckpt_acts,
        gradient_checkpointing=checkpointing,
        device=device,
        device_bytes=available,
        reference=reference,
        reference_bytes=reference_bytes,
        processes=processes,
        sharded=sharded,
        total_bytes=static + max(acts, sampling),  # sampling comes before the step's forward and backward
        quantized=quantization.describe() if quantization else None,
        sampling_bytes=sampling,
        teacher=teacher[0] if teacher else None,
        teacher_bytes=teacher_bytes,
        reward_models=reward_models[0] if reward_models else None,
        reward_models_bytes=judges_bytes,
        quantized_params=facts.linear_params if quantization else 0,
        master=master,
        optimizer_name=exp.train.optimizer,
    )


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def split_stats(enc: Encoded, examples: int, max_length: int) -> SplitStats:
    lengths = sorted(int(n) for n in enc.lengths())
    return SplitStats(
        examples=examples,
        measured=len(lengths),
        tokens_p50=_percentile(lengths, 0.5),
        tokens_p90=_percentile(lengths, 0.9),
        tokens_p99=_percentile(lengths, 0.99),
        tokens_max=lengths[-1],
        truncated=sum(n > max_length for n in lengths),
        loss_tokens=int(enc.loss_tokens(max_length).sum()),
        without_loss=len(enc.no_loss_after(max_length)),
    )


def data_stats(inputs: Inputs) -> DataStats:
    exp, splits, tokenizer = inputs.exp, inputs.splits, inputs.tokenizer
    n_eval = len(splits.eval.rows) if splits.eval else 0
    eval_source = splits.eval.source if splits.eval else None
    sources = splits.sampled_from()
    if tokenizer is None:
        empty = SplitStats(len(splits.train.rows), 0, 0, 0, 0, 0, 0, 0)
        return DataStats(
            splits.format,
            empty,
            SplitStats(n_eval, 0, 0, 0, 0, 0, 0, 0) if splits.eval else None,
            eval_source,
            note="no tokenizer beside the model config: token statistics skipped",
            sources=sources,
        )
    max_length = exp.train.max_length
    train_enc, eval_enc = inputs.encoded[0], inputs.encoded[1] if splits.eval else None
    also = {name: split_stats(inputs.also[name], len(split.rows), max_length) for name, split in splits.also.items()}
    return DataStats(
        splits.format,
        split_stats(train_enc, len(splits.train.rows), max_length),
        split_stats(eval_enc, n_eval, max_length) if eval_enc else None,
        eval_source,
        first_example=loss_segments(tokenizer, train_enc.examples[0]),
        tokens=inputs.checks,
        sources=sources,
        also=also,
    )


def optimizer_steps(exp: Experiment, n_train: int) -> int:
    if exp.train.max_steps:
        return exp.train.max_steps
    return math.ceil(steps_per_epoch(exp, n_train) * exp.train.epochs)


def check_rhythm(exp: Experiment, n_train: int, measured: int, unsupervised: int) -> None:
    """Refuse settings that cannot work with this data (`plan` and `train` both call it).

    `measured` rows were tokenized, `unsupervised` of them carry no loss within max_length.
    """
    from tunelab.methods import get_method

    t = exp.train
    samples = get_method(exp.method).samples(exp)
    if t.batch_size > n_train * samples:
        each = f" x {samples} completions" if samples > 1 else ""
        raise ConfigError(
            f"train.batch_size: {t.batch_size} is more than the {n_train}{each} training examples; use at most "
            f"{n_train * samples}"
        )
    steps = optimizer_steps(exp, n_train)
    if t.warmup >= 1 and t.warmup >= steps:
        raise ConfigError(
            f"train.warmup: {t.warmup:g} steps is not less than the run's {steps} optimizer steps, so the learning "
            "rate would never leave warmup; use fewer steps or a fraction below 1"
        )
    # Checkpoints between the steps that train on one sampled batch (GRPO's iterations) could not resume the run.
    every, per_epoch, n = save_every(t, has_eval=True), steps_per_epoch(exp, n_train), exp.steps_per_sampling
    if every and every % n:
        raise ConfigError(
            f"train.{'save_steps' if t.save_steps else 'eval_steps'}: {every} puts checkpoints within the {n} steps "
            f"that train on one sampled batch (grpo.iterations: {n}), which TRL keeps in memory only, so a resume "
            f"from them would not go on as the run did; use a multiple of {n}"
        )
    if not every and t.epochs > 1 and per_epoch % n and not t.max_steps:
        raise ConfigError(
            f"train.save_steps: the checkpoint at each epoch's end (step {per_epoch}, ...) falls within the {n} steps "
            f"that train on one sampled batch (grpo.iterations: {n}), which TRL keeps in memory only, so a resume "
            f"from it would not go on as the run did; set train.save_steps to a multiple of {n}"
        )
    if measured and unsupervised == measured:
        raise ConfigError(
            f"train.max_length: {t.max_length} leaves none of the training examples with a token that carries "
            "loss; raise it"
        )


def position_limit(model) -> tuple[int | None, bool]:
    """(the positions the model was trained on, whether they are learned embeddings): max_position_embeddings (GPT-2's
    n_positions, MPT's max_seq_len) of its text config; learned where a position embedding table holds them (GPT-2,
    OPT, GPT-Neo), which cannot take a position past its end, where rotary and ALiBi models run on, untrained."""
    import torch.nn as nn

    config = model.config.get_text_config()
    limit = next(
        (
            v
            for k in ("max_position_embeddings", "n_positions", "max_seq_len")
            if isinstance(v := getattr(config, k, None), int)
        ),
        None,
    )
    words = model.get_input_embeddings()
    # A table of the text's positions: its size is the limit (OPT's has two more rows); an image-text model's
    # vision tower has a table of its patches' positions beside it.
    learned = limit is not None and any(
        isinstance(m, nn.Embedding)
        and m is not words
        and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        and limit <= m.num_embeddings <= limit + 2
        for name, m in model.named_modules()
    )
    return limit, learned


def eva_check(exp: Experiment, train: Encoded, t: SplitStats) -> str | None:
    """init: eva takes r directions from each training batch's supervised tokens: where no batch of the run's
    micro batch size can hold r of them, refused before anything loads (or, where plan read only the first rows of
    the split, a warning)."""
    from tunelab.scopes.lora import eva_too_few

    lora = exp.scope.lora
    if lora is None or lora.init != "eva" or not t.measured:
        return None
    per_forward = batching(exp.train, exp.method).per_forward
    most = int(sum(sorted(train.loss_tokens(exp.train.max_length))[-per_forward:]))
    if most >= lora.r:
        return None
    batch = f"{per_forward} example{'s' if per_forward > 1 else ''}"
    if t.measured == t.examples:
        raise ConfigError(eva_too_few(lora.r, f"no batch of {batch} here can have that many (at most {most})"))
    return eva_too_few(lora.r, f"no batch of {batch} of {examples_read(t)} can have that many (at most {most})")


def examples_read(t: SplitStats) -> str:
    """The training examples plan's counts are of: all of them, or the rows it read spread over a large split."""
    if t.measured < t.examples:
        return f"the {t.measured:,} training examples plan read, spread over all {t.examples:,}"
    return f"{t.measured:,} training examples"


def counted(count: int, t: SplitStats) -> str:
    """`count` of the training examples plan read (examples_read) and, where it read a part of the split, about how
    many of the whole split that makes (two significant digits)."""
    if t.measured == t.examples:
        return f"{count:,} of {examples_read(t)}"
    about = int(float(f"{count * t.examples / t.measured:.2g}"))
    return f"{count:,} of {examples_read(t)} (so about {about:,} in all)"


def positions_check(limit: int | None, learned: bool, max_length: int, longer: int, t: SplitStats) -> str | None:
    """For the model's `position_limit`: raises for a max_length past learned position embeddings (the first longer
    example would stop training with an index error, on CUDA a device-side assert); a warning where `longer` of the
    training examples `t` counts go past the positions a rotary model was trained on."""
    if limit is None or max_length <= limit:
        return None
    if learned:
        raise ConfigError(
            f"train.max_length: {max_length} is past the {limit} positions the model learned embeddings for, and "
            f"an example longer than that stops training; set train.max_length: {limit}"
        )
    if not longer:
        return None
    return (
        f"{counted(longer, t)} are longer than the {limit} positions the model was trained on "
        f"(max_position_embeddings), and train.max_length={max_length} keeps them: it has never seen those positions; "
        f"set train.max_length: {limit}, or extend its context (rope_scaling) on purpose"
    )


def planned_scope(model, scope: Scope, tokenizer=None) -> tuple[object, ResolvedScope]:
    """apply_scope as plan applies it to the model it built on the meta device: what the scope adds is shapes too
    (PEFT builds a tied head's trainable copy at full size and initialises it, unless told where)."""
    import torch

    from tunelab.scopes import apply_scope

    with torch.device("meta"):
        return apply_scope(model, scope, tokenizer)


def router_aux_loss(method: Method, train: TrainSettings, config: PretrainedConfig) -> tuple[float | None, str | None]:
    """The weight of a mixture-of-experts model's router load-balancing loss that the method's TRL trainer is given
    (None: TRL's own choice, the model config's router_aux_loss_coef), and plan's line on it: TRL's SFT, DPO, KTO
    and GRPO trainers add that loss to the loss they train and evaluate on. The line is None for a model without a
    router, or a method whose trainer adds none; train.router_aux_loss is refused there, and where the loss cannot
    be computed."""
    text = config.get_text_config()
    name, setting = type(text).__name__.removesuffix("Config"), train.router_aux_loss
    routed = hasattr(text, "output_router_logits")  # TRL's test: the model returns its router logits on request
    dense = getattr(text, "is_moe", None) is False  # Doge's dense checkpoints: a router's settings, and no router
    if setting is not None and (not routed or dense):
        has = "is_moe: false" if dense else "no output_router_logits"
        raise ConfigError(
            f"train.router_aux_loss: {name} is no mixture of experts with a load-balancing loss (its config has "
            f"{has}); remove the key"
        )
    if dense and method.router_aux_loss:  # TRL would weigh the router logits it never returns: IndexError
        return 0.0, None
    if setting is not None and not method.router_aux_loss:
        raise ConfigError(
            f"train.router_aux_loss: TRL's {method.name.upper()} trainer takes no weight for the load-balancing loss; "
            "remove the key"
        )
    if not routed or not method.router_aux_loss:
        return None, None
    declared = getattr(text, "router_aux_loss_coef", None)
    if setting and declared is None:  # DeepSeek-V3, GLM-4.5: their models compute no such loss
        raise ConfigError(
            f"train.router_aux_loss: {name}'s config declares no router_aux_loss_coef, so Transformers computes no "
            "load-balancing loss for it; remove the key"
        )
    weight = (declared or 0.0) if setting is None else setting
    # TRL's fused loss (SFT, DPO, KTO, GRPO) reads the experts' count as num_experts: a config that names it otherwise
    # (num_local_experts: Granite-MoE, Phi-3.5-MoE, Llama 4) failed at the first step.
    if weight and method.fused_head and not hasattr(text, "num_experts"):
        unread = f"TRL's fused loss reads the experts' count as num_experts, which {name}'s config does not name"
        if setting is not None:
            raise ConfigError(f"train.router_aux_loss: {unread}, so the first step would fail; remove the key")
        off = f"off (the config's x {weight:g} would fail at the first step: {unread})"
        return 0.0, f"router load-balancing loss: {off}"
    if setting is not None:
        source = "train.router_aux_loss"
    elif declared:
        source = "the model config's router_aux_loss_coef; train.router_aux_loss: 0 turns it off"
    else:
        source = "the model config declares no router_aux_loss_coef"
    if weight == 0:
        return setting, f"router load-balancing loss: off ({source})"
    return setting, f"router load-balancing loss x {weight:g}, added to the loss trained and evaluated on ({source})"


def make_plan(exp: Experiment, inputs: Inputs | None = None) -> Plan:
    """What `train` will do, from the config alone. `inputs`: read already (by `tunelab train`, which plans
    and then trains over the same reads)."""
    from tunelab.models import check_compile, check_quantization, meta_model, pick_device
    from tunelab.scopes import get_scope, init_source

    inputs = inputs or read_inputs(exp)
    model = meta_model(inputs.config, exp.model.trust_remote_code, model_head(exp.method))
    facts = model_facts(exp.model.id, model)
    continued = []
    if exp.init_from is not None and not Path(exp.init_from).exists():  # a stage planned before the one it follows
        continued = [
            f"init_from: '{exp.init_from}' does not exist yet; train checks it, and counts here are the scope's"
        ]
    elif (source := init_source(exp)) is not None:  # the starting point's own adapter, as training loads it
        model, continued = get_scope(exp.scope.kind).continued(model, source, exp.scope)
    model, resolved = planned_scope(model, exp.scope, inputs.tokenizer)
    resolved.warnings += continued + untrained_warnings(exp, model, inputs)
    device = pick_device(exp.model.device)
    if exp.model.quantization is not None:
        check_quantization(exp.model.quantization, device)
    if exp.train.compile:
        check_compile(device)
    several = several_gpus(device, inputs.engine)
    dtype = exp.model.dtype if exp.model.dtype != "auto" else _auto_dtype_name(device)
    teacher = None
    if exp.distill is not None and _run_to_come(exp.distill.teacher, exp.output.dir):  # a stage before its teacher
        resolved.warnings.append(
            f"distill.teacher: '{exp.distill.teacher}' does not exist yet (a run of output.dir to come); train checks "
            "it, and the memory estimate here leaves the teacher out"
        )
    elif exp.distill is not None:
        label, size, said = teacher_size(exp, inputs, dtype, device)
        teacher = (label, size)
        resolved.warnings += said
    coming = [r for r in exp.grpo.rewards if _run_to_come(r, exp.output.dir)] if exp.grpo is not None else []
    if coming:  # a study's stage before the reward model it trains against
        resolved.warnings.append(
            f"grpo.rewards: {', '.join(coming)} does not exist yet (a run of output.dir to come); train checks it, "
            "and the memory estimate here leaves it out"
        )
        rest = [r for r in exp.grpo.rewards if r not in coming]
        exp = exp.model_copy(update={"grpo": exp.grpo.model_copy(update={"rewards": rest})})
    judges = reward_models_size(exp, dtype, device)
    memory = estimate_memory(facts, resolved, exp, dtype, device, inputs.engine, teacher, judges)
    if (fails := half_gradients_refusal(device, dtype, memory.master, half_trained(resolved))) is not None:
        raise ConfigError(fails)
    warnings = list(resolved.warnings) + ([several] if several else [])
    if (too_big := memory_warning(memory, exp.method)) is not None:
        warnings.append(too_big)
    stats = data_stats(inputs)
    stats.overlap = overlap_warnings(inputs.splits)
    warnings += stats.overlap
    check_rhythm(exp, stats.train.examples, stats.train.measured, stats.train.without_loss)
    if inputs.encoded and (eva := eva_check(exp, inputs.encoded[0], stats.train)) is not None:
        warnings.append(eva)
    from tunelab.methods import get_method

    method = get_method(exp.method)
    method.check_data(exp, inputs.encoded, inputs.tokenizer)
    _, router = router_aux_loss(method, exp.train, model.config)
    limit, learned = position_limit(model)
    longer = int((inputs.encoded[0].lengths() > limit).sum()) if inputs.encoded and limit is not None else 0
    if (past := positions_check(limit, learned, exp.train.max_length, longer, stats.train)) is not None:
        warnings.append(past)
    if exp.scope.lora is not None and exp.scope.lora.r > facts.hidden_size:
        h = facts.hidden_size
        warnings.append(
            f"scope.lora.r={exp.scope.lora.r} is above the model's hidden size ({h}): an update cannot have "
            f"a higher rank than its smallest dimension, so r={h} gives the same capacity for less memory"
        )
    splits = [stats.train, *([stats.eval] if stats.eval else []), *stats.also.values()]
    rows_read = sum(s.measured for s in splits) if any(s.measured < s.examples for s in splits) else None
    if stats.tokens is not None:
        warnings += stats.tokens.warnings(exp.train.max_length, rows_read)
    if (raw := plain_text_warning(exp, inputs)) is not None:
        warnings.append(raw)
    if stats.train.truncated:
        warnings.append(
            f"{counted(stats.train.truncated, stats.train)} are longer than train.max_length={exp.train.max_length} "
            "and will be truncated"
        )
    if (lossy := half_update_warning(exp, memory, resolved)) is not None:
        warnings.append(lossy)
    folder = Path(exp.output.dir) / exp.run_name
    disk = estimate_disk(resolved, exp, memory, stats.train.examples, tokenizer_bytes(inputs.tokenizer), folder)
    if (no_room := disk_refusal(disk, exp.train.save_total_limit)) is not None:
        warnings.append(no_room)
    described = method.describe(exp)
    steps = schedule(exp, stats.train.examples, bool(inputs.splits.eval))
    return Plan(
        exp.name,
        exp.method,
        facts,
        resolved,
        memory,
        disk,
        batching(exp.train, exp.method),
        stats,
        warnings,
        steps,
        described,
        router,
    )


def teacher_size(exp: Experiment, inputs: Inputs, dtype: str, device: str) -> tuple[str, int, list[str]]:
    """distill's teacher, checked against the student (the same vocabulary and tokenizer), by its label, the bytes
    its weights take in `dtype` (quantized where distill.teacher_quantization says), from its config alone, and the
    warnings about it."""
    from tunelab.models import check_quantization, meta_model
    from tunelab.teacher import as_teacher_errors, check_teacher, resolve_teacher, teacher_config

    teacher = resolve_teacher(exp)
    config = teacher_config(teacher)
    warnings = check_teacher(teacher, config, inputs.config, inputs.tokenizer)
    quantization = teacher.settings.quantization
    with as_teacher_errors():
        if quantization is not None:
            check_quantization(quantization, device)
        model = meta_model(config, teacher.settings.trust_remote_code)
    return teacher.label, frozen_bytes(model, quantization, DTYPE_BYTES[dtype]), warnings


def frozen_bytes(model, quantization: Quantization | None, b: int) -> int:
    """The bytes a frozen model's weights take (a teacher, a reward model), `b` a parameter, or with its decoder's
    linear weights packed as `quantization` says and the rest (embeddings, norms, the head) `b` a parameter."""
    total = sum(p.numel() for p in model.parameters())
    if quantization is None:
        return total * b
    linear = linear_params(model)
    return int(linear * quantized_bytes_per_param(quantization)) + (total - linear) * b


def reward_models_size(exp: Experiment, dtype: str, device: str) -> tuple[str, int] | None:
    """GRPO's reward models (runs of method: reward, or published ones, model:<id>, named in grpo.rewards), loaded
    beside the policy: their names (and the quantization of the published ones, grpo.reward_quantization) and the
    bytes their weights take (each in its own run's dtype where it names one, else the run's), from their configs
    alone; None where no reward is a model."""
    from tunelab.models import check_quantization, load_config, meta_model
    from tunelab.reward_model import MODEL_PREFIX, published_settings
    from tunelab.rewards import check_rewards, reward_models
    from tunelab.runs import load_run_experiment

    judges = reward_models(exp.grpo.rewards) if exp.grpo is not None else []
    if not judges:
        return None  # a reward_quantization without a reward model is refused with the rewards' own check
    quantization = exp.grpo.reward_quantization
    # each a completed reward run, or a published one, before its files are read
    check_rewards(exp.grpo.rewards, quantization)
    if quantization is not None:
        check_quantization(quantization, device, "grpo.reward_quantization")
    total = 0
    for spec in judges:
        published = spec.startswith(MODEL_PREFIX)
        own = published_settings(spec, quantization) if published else load_run_experiment(Path(spec)).model
        model = meta_model(load_config(own), own.trust_remote_code, "score")
        total += frozen_bytes(model, own.quantization, DTYPE_BYTES[own.dtype if own.dtype != "auto" else dtype])
    names = ", ".join(Path(spec.removeprefix(MODEL_PREFIX)).name for spec in judges)
    return names + (f", {quantization.describe()}" if quantization else ""), total


def _run_to_come(named: str, output_dir: str) -> bool:
    """A teacher or reward model named as a run folder in output.dir that is not there yet."""
    path = Path(named)
    return not path.exists() and path.resolve().parent == Path(output_dir).resolve()


def half_trained(scope: ResolvedScope) -> int:
    """Trained weights kept in the model's dtype where there is no float32 master copy: original weights opened
    (an adapter's own weights are float32 in any case)."""
    from tunelab.scopes import get_scope

    return scope.opened_params if get_scope(scope.kind).adds_parameters else scope.trainable_params


def half_update_warning(exp: Experiment, memory: Memory, scope: ResolvedScope) -> str | None:
    """Trained weights updated in bfloat16/float16 themselves lose the updates below half their precision."""
    from tunelab.methods.common import HALF, autocasts

    if memory.master != "none" or memory.dtype not in HALF:
        return None
    half = half_trained(scope)
    if not half:
        return None
    if autocasts(memory.device, memory.dtype):
        fix = "set train.master_weights: float32 (float32 copies of the trained weights, the forward under autocast)"
    else:
        fix = f"set model.dtype: float32 ({memory.device} trains {memory.dtype} without autocast here)"
    return (
        f"{half:,} trained weights update in {memory.dtype} itself, which loses every update smaller than half its "
        f"precision at the weight (at train.learning_rate {exp.train.learning_rate:g}, most of them for weights of "
        f"scale 0.02); {fix}"
    )


def plain_text_warning(exp: Experiment, inputs: Inputs) -> str | None:
    """Plain-text prompts for a model with a chat template: they train as raw text, in a format the model does not
    answer in, unless data.as_chat puts them into it."""
    tokenizer, rows = inputs.tokenizer, inputs.splits.train.rows
    if (
        exp.data.as_chat
        or tokenizer is None
        or not tokenizer.chat_template
        or not isinstance(rows[0].get("prompt"), str)
    ):
        return None
    return (
        "data.train holds plain-text prompts, which train as raw text without the model's chat template; to train "
        "in the chat format it answers in, set data.as_chat: true (each prompt a user turn, each answer the "
        "assistant's reply)"
    )


def untrained_warnings(exp: Experiment, model, inputs: Inputs) -> list[str]:
    """Where the base's weights are a local folder: the tokens the data uses that the base never trained and the
    scope leaves frozen (train checks the same on the loaded weights)."""
    from functools import partial

    from tunelab.models import checkpoint_rows, model_path
    from tunelab.scope import untrained_tokens
    from tunelab.scopes import untrained_warning
    from tunelab.templates import added_ids_used

    folder = model_path(exp.model.id)
    if inputs.tokenizer is None or not Path(folder).is_dir():
        return []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    used = added_ids_used(inputs.tokenizer, inputs.encoded)
    untrained = untrained_tokens(base, used, partial(checkpoint_rows, folder))
    note = untrained_warning(model, untrained, inputs.tokenizer, exp.scope)
    return [note] if note else []


def _auto_dtype_name(device: str) -> str:
    from tunelab.models import pick_dtype

    return str(pick_dtype("auto", device)).removeprefix("torch.")
