"""DPO: experiment + scoped model + preference pairs -> TRL's DPOConfig and DPOTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import DPOSettings, TrainSettings
from tunelab.methods.base import Method, TrainerInputs
from tunelab.methods.common import Hardware, instantiate, trl_config
from tunelab.methods.preference import frozen_copy, preference_arguments, preference_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import DPOTrainer


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict],
    eval_rows: list[dict] | None,
    train: TrainSettings,
    dpo: DPOSettings,
    reference: str,
    hw: Hardware,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    ref_cache: Path | None = None,
) -> DPOTrainer:
    from trl import DPOConfig, DPOTrainer

    from tunelab.methods.sampling import seeded

    config = trl_config(
        DPOConfig,
        **preference_arguments(train, hw, output_dir, eval_rows is not None, "dpo", len(train_rows)),
        beta=dpo.beta,
        loss_type=[dpo.loss_type] if isinstance(dpo.loss_type, str) else dpo.loss_type,
        max_length=train.max_length,
        precompute_ref_log_probs=reference == "precomputed",
    )

    class Trainer(seeded(DPOTrainer)):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            if ref_cache is None:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            return cached_ref_logps(
                ref_cache / f"{name}.safetensors",
                dataset,
                lambda: super(Trainer, self)._precompute_ref_logps(dataset, name, batch_size),
            )

    # A live reference for a scope without adapters is a frozen copy of the *starting* model; left to
    # itself TRL would reload the base from its path, which is wrong when starting from an SFT run.
    extra = {"ref_model": frozen_copy(model)} if reference == "copy" else {}
    return instantiate(Trainer, model, config, tokenizer, train_rows, eval_rows, callbacks, **extra)


def cached_ref_logps(path: Path, dataset, compute):
    """Reference log-probs from a cache file keyed by base, data and template, or computed and stored there."""
    import os

    import torch
    from safetensors.torch import load_file, save_file

    if path.is_file():
        cached = load_file(str(path))
        if len(cached["chosen"]) == len(dataset):
            return dataset.add_column("ref_chosen_logps", cached["chosen"].tolist()).add_column(
                "ref_rejected_logps", cached["rejected"].tolist()
            )
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {"chosen": torch.tensor(out["ref_chosen_logps"]), "rejected": torch.tensor(out["ref_rejected_logps"])}, str(tmp)
    )
    os.replace(tmp, path)
    return out


def build(inputs: TrainerInputs) -> DPOTrainer:
    train_rows, eval_rows = preference_rows(inputs)
    return build_trainer(
        inputs.model,
        inputs.tokenizer,
        train_rows,
        eval_rows,
        inputs.exp.train,
        inputs.exp.dpo,
        inputs.reference,
        inputs.hw,
        inputs.output_dir,
        inputs.callbacks,
        ref_cache=inputs.ref_cache,
    )


METHOD = Method(
    name="dpo",
    formats=("preference",),
    sequences=2,
    reference=True,
    padding_free=False,
    build=build,
    settings=lambda exp: exp.dpo,
    caches_reference=True,
    fused_head=True,
    router_aux_loss=True,
)
