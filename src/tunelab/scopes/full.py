"""Full fine-tuning: every parameter of the language model trains; the run holds a whole Transformers model folder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Scope
from tunelab.errors import TunelabError
from tunelab.runs import FULL_MODEL
from tunelab.scopes.base import BaseLoader, ScopeKind

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.scope import ResolvedScope


class Full(ScopeKind):
    name = "full"
    result = FULL_MODEL

    def apply(self, model: nn.Module, scope: Scope, tokenizer=None) -> tuple[nn.Module, ResolvedScope]:
        from tunelab.scope import ResolvedScope, find_decoder, other_towers

        frozen = set(other_towers(model))  # an image-text checkpoint's vision encoder: text cannot train it
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        return model, ResolvedScope(kind=self.name, layers=list(range(find_decoder(model).count)))

    def save(self, model: nn.Module, state: dict[str, torch.Tensor], trainable: list[str], run_dir: Path) -> None:
        model.save_pretrained(run_dir / FULL_MODEL, state_dict=state)

    def in_checkpoint(self, checkpoint: Path) -> Path:
        # A Transformers folder, as model/ is: config.json beside the safetensors weights (FSDP and DeepSpeed save
        # shards of their own instead, which only a resume reads).
        weights = ("model.safetensors", "model.safetensors.index.json")
        if not (checkpoint / "config.json").is_file() or not any((checkpoint / w).is_file() for w in weights):
            raise TunelabError(
                f"{checkpoint}: holds no config.json and model.safetensors (a checkpoint in a sharding engine's own "
                "format, which only a resume reads); compare the run"
            )
        return checkpoint

    def trained(self, run_dir: Path, base: BaseLoader, trainable: bool = False) -> nn.Module:
        from transformers import AutoConfig

        from tunelab.models import auto_class, backbone_found

        # The run's own weights, in the dtype and on the device its base would get.
        config = AutoConfig.from_pretrained(run_dir / FULL_MODEL)
        model = auto_class(config, base.head).from_pretrained(
            run_dir / FULL_MODEL, config=config, dtype=base.dtype, use_safetensors=True
        )
        backbone_found(model)
        return model.to(base.device)

    @contextlib.contextmanager
    def active(self, model: nn.Module, run_dir: Path, name: str, base: BaseLoader) -> Iterator[nn.Module]:
        full = self.trained(run_dir, base).eval()
        try:
            yield full
        finally:
            del full
