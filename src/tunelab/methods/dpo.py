"""DPO: experiment + scoped model + preference pairs -> TRL's DPOConfig and DPOTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import DPOSettings, TrainSettings
from tunelab.methods.common import Hardware, batching, instantiate, training_arguments, trl_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import DPOTrainer


def reference_strategy(settings: DPOSettings, scope_kind: str) -> str:
    """'adapter' (LoRA: the policy with its adapter disabled or TRL's frozen adapter copy), 'copy' or 'precomputed'."""
    if settings.reference == "precomputed" or (settings.reference == "auto" and scope_kind != "lora"):
        return "precomputed"
    return "adapter" if scope_kind == "lora" else "copy"


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

    from tunelab.methods.sampling import seeded_train_sampler

    args = training_arguments(train, hw, output_dir, eval_rows is not None, batching(train, "dpo"))
    # DPO batches hold pairs of different lengths; TRL computes no per-example length column for grouping.
    args["train_sampling_strategy"] = "random"
    config = trl_config(
        DPOConfig,
        **args,
        beta=dpo.beta,
        loss_type=[dpo.loss_type] if isinstance(dpo.loss_type, str) else dpo.loss_type,
        max_length=train.max_length,
        precompute_ref_log_probs=reference == "precomputed",
    )

    class Trainer(DPOTrainer):
        def _get_train_sampler(self, *a, **kw):
            return seeded_train_sampler(super()._get_train_sampler(*a, **kw), train.seed)

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


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    import copy

    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


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


def preference_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], fold_system: bool = False
) -> float:
    """Share of pairs where the model gives the chosen answer a higher log-probability than the rejected one."""
    import torch

    from tunelab.templates import tokenize_example

    def logp(prompt, answer) -> float:
        if isinstance(answer, list) and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        tok = tokenize_example(tokenizer, {"prompt": prompt, "completion": answer}, fold_system=fold_system)
        ids = torch.tensor([tok.input_ids], device=model.device)
        mask = torch.tensor(tok.loss_mask[1:], device=model.device, dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return token_logps[mask].sum().item()

    was_training = model.training
    model.eval()
    wins = 0
    for row in rows:
        wins += logp(row["prompt"], row["chosen"]) > logp(row["prompt"], row["rejected"])
    model.train(was_training)
    return wins / max(len(rows), 1)
