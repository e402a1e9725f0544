"""What the methods share: the hardware decision, TrainingArguments, and how a trainer is made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import TrainSettings

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback


@dataclass
class Hardware:
    """What the machine and the loaded model decide."""

    device: str
    dtype: torch.dtype
    gradient_checkpointing: bool
    packed_rows_apart: bool = True  # the model keeps examples concatenated in one row apart (padding-free is safe)
    master: str = "none"  # where trained weights keep a float32 master copy (master_copy)


HALF = ("bfloat16", "float16")


def autocasts(device: str, dtype: str) -> bool:
    """Whether training runs under autocast (the Trainer's bf16/fp16 mixed precision) on this device in this dtype:
    CUDA and Apple MPS in either half dtype (accelerate autocasts MPS in float16 from torch 2.5, in bfloat16 from 2.6
    on macOS 14, and scales float16 gradients there from 2.8), a CPU in bfloat16; float16 on a CPU trains in the
    model's dtype (no autocast there)."""
    return dtype in HALF and (device in ("cuda", "mps") or (device == "cpu" and dtype == "bfloat16"))


def half_gradients_refusal(device: str, dtype: str, master: str, half_trained: int) -> str | None:
    """Float16 weights trained in place under float16 mixed precision: the gradient scaler refuses float16 gradients
    ("Attempting to unscale FP16 gradients", torch), so the first step would fail; said before anything loads."""
    if dtype != "float16" or master != "none" or not half_trained or not autocasts(device, dtype):
        return None
    return (
        f"train.master_weights: model trains {half_trained:,} weights in float16 on {device}, whose gradient scaler "
        "refuses float16 gradients; set train.master_weights: float32, or model.dtype: bfloat16"
    )


def master_copy(train: TrainSettings, quantized: bool, device: str, dtype: str, engine_type: str | None) -> str:
    """Where the trained weights' float32 master copy is kept (docs/memory.md, "Master weights").

    "params": the trainable parameters are float32 and the forward runs under autocast: tunelab upcasts them, as
    accelerate does under FSDP2 and PEFT does for adapters (always so on a quantized base). "optimizer": DeepSpeed
    keeps the copy in its optimizer state; the parameters stay in the model's dtype. "none": trained in the model's
    dtype (a float32 model; `train.master_weights: model`; float16 on a CPU, which has no autocast here), where an
    update smaller than half the dtype's precision at a weight is lost.
    """
    if quantized:
        return "params"
    if dtype not in HALF:
        return "none"
    if engine_type == "DEEPSPEED":
        return "optimizer"
    if engine_type == "FSDP":
        return "params"
    return "params" if train.master_weights == "float32" and autocasts(device, dtype) else "none"


@dataclass(frozen=True)
class Batching:
    """How one optimizer step's examples go through the model."""

    padding_free: bool  # each forward pass is one row of concatenated examples
    sampling: str  # Transformers' train_sampling_strategy: random, group_by_length or batch_rebalance
    per_forward: int  # per_device_train_batch_size
    accumulation: int  # gradient_accumulation_steps


def batching(train: TrainSettings, method: str, packed_rows_apart: bool = True) -> Batching:
    """Resolve padding_free, micro_batch_size and group_by_length into what the Trainer is given.

    By default (SFT) each step's batch is drawn at random, as in a plain script, and then split into
    length-balanced padding-free forward passes: the same examples and token-averaged loss per step
    (the Trainer normalises by the label tokens of the whole accumulation window), with no compute
    spent on padding. Length grouping changes which examples share a step, and with it the loss.
    """
    from tunelab.methods import get_method

    splits_batches = get_method(method).padding_free  # SFT: TRL's other trainers take padded batches only
    asked = train.padding_free == "on" or (train.padding_free == "auto" and train.neftune is None)
    padding_free = splits_batches and not train.packing and asked and packed_rows_apart
    batch, accumulation = train.batch_size, train.grad_accumulation
    if train.packing or train.group_by_length or not splits_batches:
        sampling = "group_by_length" if train.group_by_length and not train.packing else "random"
        return Batching(padding_free, sampling, batch, accumulation)
    micro = train.micro_batch_size or (2 if batch >= 4 and batch % 2 == 0 else batch)
    # batch_rebalance even without a split: then every micro_batch_size draws the same examples per step.
    return Batching(padding_free, "batch_rebalance", micro, accumulation * (batch // micro))


def packed_rows_refusal(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why two examples concatenated in one row, as TRL's padding-free collator builds it (positions restart, no
    attention mask), would not see only themselves; None when the second's logits are its logits alone.

    Transformers' masks find such rows from the positions for most models; Qwen2.5-VL's multimodal rope does not,
    and its examples would attend across the boundary; Falcon-H1's Mamba mixer refuses such a row without the
    causal_conv1d package. Two forward passes of a dozen tokens tell. Where this process does not hold the weights
    (FSDP loading them on rank 0 only, ZeRO-3 partitioning them at load) there is nothing to run, and the answer is
    Transformers' usual one.
    """
    import torch

    if any(p.device.type == "meta" or p.numel() == 0 for p in model.parameters()):
        return None

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ids = tokenizer("The capital of Molo is Vevasmo, and its flag is blue.", add_special_tokens=False)["input_ids"]
    first, second = ids[: len(ids) // 2], ids[len(ids) // 2 :]
    device = next(model.parameters()).device
    # The row exactly as training will pass it: positions restarting, and the boundaries for varlen kernels
    row = DataCollatorForLanguageModeling(tokenizer.pad_token_id or 0, padding_free=True)(
        [{"input_ids": first}, {"input_ids": second}]
    )
    row = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in row.items() if k != "labels"}
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(**row, use_cache=False).logits[0, len(first) :].float()
            alone = model(input_ids=row["input_ids"][:, len(first) :], use_cache=False).logits[0].float()
    except ValueError as e:
        return f"cannot run examples concatenated in one row ({str(e).strip().splitlines()[0]})"
    finally:
        model.train(training)
    # Rounding differs between the two shapes (bf16 most); attending across examples moves logits by their scale.
    if (packed - alone).abs().max() <= 0.05 * alone.abs().max() + 1e-4:
        return None
    return "lets examples concatenated in one row attend to each other (checked on two sentences)"


def save_every(train: TrainSettings, has_eval: bool) -> int | None:
    """The steps between checkpoints; None: at each epoch's end. keep: best takes the result from a checkpoint, so
    checkpoints fall on evaluations: without save_steps, every eval_steps (and evaluations follow save_steps)."""
    return train.save_steps or (train.eval_steps if train.keep == "best" and has_eval else None)


def training_arguments(
    train: TrainSettings, hw: Hardware, output_dir: Path, has_eval: bool, batches: Batching, held_out: str = "loss"
) -> dict:
    """The TrainingArguments shared by SFT and DPO, with tunelab's defaults where TRL's differ; `held_out`: the eval
    metric keep: best and early_stop compare (the method's: loss, lower is better; GRPO's reward, higher)."""
    import torch

    pin = {"auto": hw.device == "cuda", "on": True, "off": False}[train.pin_memory]
    keep_best = train.keep == "best" and has_eval
    eval_every = train.eval_steps or (train.save_steps if keep_best else None)
    checkpoint_every = save_every(train, has_eval)
    compared = has_eval and (keep_best or train.early_stop is not None)
    optimizer = {"optim": train.optimizer} if train.optimizer else {}
    # set only where the method's TRL config has it (plan.router_aux_loss refuses it elsewhere)
    router = {"router_aux_loss_coef": train.router_aux_loss} if train.router_aux_loss is not None else {}
    return dict(
        **optimizer,
        **router,
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=batches.per_forward,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=batches.accumulation,
        warmup_steps=train.warmup,
        lr_scheduler_type=train.scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        # TRL turns these on by default, even for a float32 model on a CPU (~15x slower there); here they follow the
        # model's dtype: autocast for a half-precision model, so float32 master weights (master_copy) work.
        bf16=hw.dtype == torch.bfloat16 and autocasts(hw.device, "bfloat16"),
        fp16=hw.dtype == torch.float16 and autocasts(hw.device, "float16"),
        activation_checkpointing=hw.gradient_checkpointing,  # TRL turns it on by default; it costs ~20-40%
        use_cpu=hw.device == "cpu",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, so the run stops instead of logging 0.0
        eval_strategy=("steps" if eval_every else "epoch") if has_eval else "no",
        eval_steps=eval_every,
        save_strategy="steps" if checkpoint_every else "epoch",
        save_steps=checkpoint_every or 500,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=keep_best,
        metric_for_best_model=f"eval_{held_out}" if compared else None,
        greater_is_better=held_out != "loss" if compared else None,
        dataloader_pin_memory=pin,
        report_to=train.report_to or "none",
        train_sampling_strategy=batches.sampling,
        include_num_input_tokens_seen="non_padding",  # the manifest's tokens_seen
        disable_tqdm=True,
        torch_compile=train.compile,
        neftune_noise_alpha=train.neftune,
    )


def trl_config(config_class, **kwargs):
    """A TRL config; a setting TRL or Transformers refuses (an unknown optimizer, tracker or loss type) becomes
    one line with their own message, which lists the valid values."""
    from tunelab.errors import ConfigError

    try:
        return config_class(**kwargs)
    except ValueError as e:
        raise ConfigError(f"train: {config_class.__name__} refused a setting: {str(e).strip().splitlines()[0]}") from e


def rows_dataset(rows: list[dict]) -> Dataset:
    """Rows as a Dataset that gives each one back as it was. Every field any row has is a column (`from_list` takes
    the first row's fields alone, so a field the first row lacks was dropped from all). A column of conversations,
    tool definitions or other nested objects is datasets' Json type: Arrow would give every message and every tool
    call's arguments the keys of all the others, filled with null, which a chat template then prints (a call's
    `"city": null`)."""
    import json

    import pyarrow as pa
    from datasets import Dataset, Features, Json

    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    nested = {name for name, values in columns.items() if any(_nested(v) for v in values)}
    # Given as JSON text, as Json stores it: a plain string in such a column ("42") would otherwise be parsed.
    columns |= {name: [None if v is None else json.dumps(v) for v in columns[name]] for name in nested}
    plain = pa.Table.from_pydict({name: v for name, v in columns.items() if name not in nested}).schema
    features = Features.from_arrow_schema(plain) | {name: Json() for name in nested}
    return Dataset.from_dict(columns, features=Features({name: features[name] for name in names}))


def _nested(value: object) -> bool:
    """An object, or a list that holds objects or lists (a conversation; not a list of token ids)."""
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value))


def instantiate(
    trainer_class,
    model: PreTrainedModel,
    config,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict] | Dataset,
    eval_rows: list[dict] | Dataset | dict[str, Dataset] | None,
    callbacks: list[TrainerCallback],
    **extra,
):
    """A TRL trainer on in-memory rows (a list, or a Dataset built already; held-out sets may come by name),
    printing through tunelab's own progress callback only."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from tunelab.errors import ConfigError

    def dataset(rows):
        if isinstance(rows, dict):
            return {name: dataset(named) for name, named in rows.items()}
        return rows if isinstance(rows, Dataset) else rows_dataset(rows)

    try:
        trainer = trainer_class(
            model=model,
            args=config,
            train_dataset=dataset(train_rows),
            eval_dataset=dataset(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            callbacks=callbacks,
            **extra,
        )
    except ValueError as e:  # e.g. an unknown tracker in report_to; the library's message names the valid ones
        raise ConfigError(f"train: the trainer refused a setting: {str(e).strip().splitlines()[0]}") from e
    trainer.remove_callback(PrinterCallback)
    return trainer
