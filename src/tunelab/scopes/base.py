"""What every scope kind owns: making its parameters trainable, saving what trained, and putting a saved result
back on a base model (for init_from, compare and export).

A new kind is one module beside this one that subclasses `ScopeKind`, plus its line in `REGISTRY`
(`tunelab/scopes/__init__.py`); docs/adding-a-method.md walks through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from tunelab.config import ModelSettings, Scope

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    from tunelab.scope import ResolvedScope


@dataclass
class BaseLoader:
    """How to load the base model a run was trained on: its settings, in this dtype, on this device."""

    settings: ModelSettings
    dtype: torch.dtype
    device: str
    config: PretrainedConfig | None = None  # the model's config when read already
    weights: str | None = None  # where its weights are (models.weights_path) when found already
    head: str = "lm"  # the model's head: "lm", or "score" for a reward model (config.model_head)

    @classmethod
    def pick(cls, settings: ModelSettings, device: str | None = None, head: str = "lm") -> BaseLoader:
        """The loader a run's model settings ask for here: their device (or `device`) and the dtype for it."""
        from tunelab.models import pick_device, pick_dtype

        device = device or pick_device(settings.device)
        return cls(settings, pick_dtype(settings.dtype, device), device, head=head)

    def load(self) -> PreTrainedModel:
        from tunelab.models import load_model

        return load_model(self.settings, self.dtype, self.device, self.config, self.weights, self.head)


@dataclass
class MadeElsewhere:
    """A scope kind's result saved by a plain script, as its files describe it."""

    kind: str  # the scope kind that reads it
    base: str | None  # the base model it names (PEFT's base_model_name_or_path)
    label: str  # what it trains, as compare's table shows a scope
    trainable_params: int


def base_alone(model: nn.Module) -> contextlib.AbstractContextManager:
    """The shared base without any attached LoRA adapter for the duration of a `with` block (a plain model is its
    own base)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class ScopeKind:
    name: ClassVar[str]
    result: ClassVar[str]  # the file or folder in a run directory that holds the trained result
    # The trainable parameters are new ones added beside the frozen base (LoRA), kept in float32 by PEFT, and the
    # trained model can be switched back to its base (which is what a preference method's reference needs).
    adds_parameters: ClassVar[bool] = False

    def apply(self, model: nn.Module, scope: Scope, tokenizer=None) -> tuple[nn.Module, ResolvedScope]:
        """Make exactly this scope's parameters trainable and describe them (counts are filled in by the caller).
        `tokenizer`: the model's, where the scope names tokens."""
        raise NotImplementedError

    def continued(self, model: nn.Module, source: Path, scope: Scope) -> tuple[nn.Module, list[str]]:
        """Plan: `model` (on the meta device) as a run continuing `source` (init_from) starts, with notes. A kind
        whose result is original tensors trains its own scope: the source's tensors are only put on the base."""
        return model, []

    def made_elsewhere(self, folder: Path) -> MadeElsewhere | None:
        """The result of this kind a plain script saved in `folder` (not a tunelab run: a PEFT adapter folder), which
        init_from starts from and compare compares; None where the folder holds none, and a ConfigError with the fix
        where it holds one tunelab cannot use."""
        return None

    def in_checkpoint(self, checkpoint: Path) -> Path:
        """What in a Trainer checkpoint of a run of this kind holds what `result` holds at the end (the file or
        folder compare reads a checkpoint's weights from); a TunelabError with the fix where it cannot be read so."""
        raise NotImplementedError

    def token_fix(self, tokens: list[str]) -> str:
        """The setting that trains these tokens' embedding rows under this kind of scope."""
        return "train the embeddings and lm_head"

    def written_for(self, scope: Scope, model: Callable[[], nn.Module | None]) -> tuple[Scope, str | None]:
        """The scope `tunelab init` writes for a model: `scope` as it is, or one this model needs instead, with the
        change in words. `model` builds it on the meta device where its config can be read (None where it cannot),
        for a kind that needs to look."""
        return scope, None

    def save(self, model: nn.Module, state: dict[str, torch.Tensor], trainable: list[str], run_dir: Path) -> None:
        """Write the trained result to `run_dir / self.result`. `state` is the whole state dict, gathered."""
        raise NotImplementedError

    def trained(self, run_dir: Path, base: BaseLoader, trainable: bool = False) -> nn.Module:
        """The run's trained model: its result on a freshly loaded base (or, for full runs, its own weights)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, run_dir: Path, name: str) -> nn.Module:
        """Compare: make a run available on the one shared base model (LoRA adds its adapter by name)."""
        return model

    def batches_with_base(self, model: nn.Module, name: str) -> bool:
        """Compare: the attached run `name` generates in the same batches as the base and other such runs."""
        return False

    @contextlib.contextmanager
    def active(self, model: nn.Module, run_dir: Path, name: str, base: BaseLoader) -> Iterator[nn.Module]:
        """Compare: the run's model for the duration of a `with` block, the shared base restored after."""
        raise NotImplementedError
        yield model

    def label(self, scope: Scope, target_modules: list[str], layers: str) -> str:
        """The scope in a comparison's table."""
        return self.name

    def export(self, run_dir: Path, out: Path, merge: bool, base: BaseLoader) -> tuple[nn.Module | None, str]:
        """What `tunelab export` writes: the model it saves as a Transformers folder (None where the kind wrote
        `out` itself, as a LoRA adapter does) and what that is."""
        return self.trained(run_dir, base), self.name
