"""Partial fine-tuning: chosen original tensors open (decoder blocks, final norm, lm_head, embeddings, patterns);
only those tensors are saved, and put back on the base to use the run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Scope
from tunelab.errors import TunelabError
from tunelab.runs import TRAINED
from tunelab.scopes.base import BaseLoader, ScopeKind, base_alone

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tunelab.scope import ResolvedScope


class Partial(ScopeKind):
    name = "partial"
    result = TRAINED

    def label(self, scope: Scope, target_modules: list[str], layers: str) -> str:
        return f"partial blocks {layers}"

    def token_fix(self, tokens: list[str]) -> str:
        return "set scope.partial.embeddings: true and lm_head: true"

    def apply(self, model: nn.Module, scope: Scope, tokenizer=None) -> tuple[nn.Module, ResolvedScope]:
        from tunelab.scope import ResolvedScope, partial_parameters

        names, blocks, notes = partial_parameters(scope.partial, model)
        opened = set(names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in opened)
        # Trainer checkpoints then hold what trains, not the frozen rest of the model, which the base gives back on a
        # resume (the Trainer loads a checkpoint's weights non-strictly): Transformers' own list of keys a model
        # need not save. The mission's partial run on Llama-3.1-8B saves 5.6 GB of weights a checkpoint, not 18.8.
        # Every state-dict key that is not an opened tensor, aliases included (a frozen head tied to the embeddings
        # is one tensor under two names).
        trained = {id(p) for name, p in model.named_parameters() if name in opened}
        frozen = {key for key, t in model.state_dict(keep_vars=True).items() if id(t) not in trained}
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | frozen
        return model, ResolvedScope(kind=self.name, layers=blocks, warnings=notes)

    def save(self, model: nn.Module, state: dict[str, torch.Tensor], trainable: list[str], run_dir: Path) -> None:
        from safetensors.torch import save_file

        tensors = {n: state[n].detach().cpu().contiguous() for n in trainable}
        tmp = run_dir / f".{TRAINED}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "tunelab": "partial"})
        os.replace(tmp, run_dir / TRAINED)

    def in_checkpoint(self, checkpoint: Path) -> Path:
        # The frozen tensors are left out of the Trainer's save (_keys_to_ignore_on_save): its model.safetensors holds
        # exactly the trained ones, under the names trained.safetensors gives them.
        weights = checkpoint / "model.safetensors"
        if not weights.is_file():
            raise TunelabError(
                f"{checkpoint}: has no single model.safetensors (a checkpoint saved in shards, or in a sharding "
                "engine's own format, which only a resume reads); compare the run"
            )
        return weights

    def trained(self, run_dir: Path, base: BaseLoader, trainable: bool = False) -> nn.Module:
        import torch
        from safetensors.torch import load_file

        model = base.load()
        params = dict(model.named_parameters())
        trained = load_file(str(run_dir / TRAINED), device=str(next(model.parameters()).device))
        missing = set(trained) - set(params)
        if missing:
            raise TunelabError(f"{run_dir}: trained tensors {sorted(missing)[:3]} do not exist in the base model")
        with torch.no_grad():
            for name, tensor in trained.items():
                params[name].copy_(tensor)
        return model

    @contextlib.contextmanager
    def active(self, model: nn.Module, run_dir: Path, name: str, base: BaseLoader) -> Iterator[nn.Module]:
        # On a base that also carries LoRA adapters (a comparison of both kinds), the adapters are off meanwhile.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with base_alone(model), _swapped(base, run_dir / TRAINED):
            yield model


@contextlib.contextmanager
def _swapped(model: nn.Module, path: Path) -> Iterator[None]:
    """The trained tensors on the base for the duration of a `with` block, the originals restored after."""
    import torch
    from safetensors.torch import load_file

    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, tensor in load_file(str(path)).items():
                # Under LoRA adapters, an adapted module keeps its original weight in `base_layer`.
                module, _, leaf = name.rpartition(".")
                target = name if name in params else f"{module}.base_layer.{leaf}"
                if target not in params:
                    raise TunelabError(f"{path}: tensor {name} does not exist in the base model")
                saved[target] = params[target].detach().clone()
                params[target].copy_(tensor)
        yield
    finally:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
