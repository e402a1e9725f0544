"""Scope kinds: LoRA, partial and full fine-tuning, each owning how it applies, saves and loads its result.

Intent -> explicit names lives in `tunelab.scope`; what to do with those names lives here, one module a kind.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Scope, model_head
from tunelab.errors import ConfigError, TunelabError
from tunelab.scopes.base import BaseLoader, MadeElsewhere, ScopeKind, base_alone
from tunelab.scopes.full import Full
from tunelab.scopes.lora import Lora
from tunelab.scopes.partial import Partial

if TYPE_CHECKING:
    from torch import nn

    from tunelab.config import Experiment
    from tunelab.runs import Manifest
    from tunelab.scope import ResolvedScope

REGISTRY: dict[str, ScopeKind] = {kind.name: kind for kind in (Lora(), Partial(), Full())}

__all__ = [
    "REGISTRY",
    "BaseLoader",
    "MadeElsewhere",
    "ScopeKind",
    "apply_scope",
    "attach_runs",
    "base_alone",
    "checkpoint_run",
    "checkpoint_views",
    "get_scope",
    "init_source",
    "load_trained",
    "made_elsewhere",
    "run_scope",
    "untrained_warning",
]


def get_scope(name: str) -> ScopeKind:
    if name not in REGISTRY:
        raise TunelabError(f"unknown scope kind '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def made_elsewhere(folder: Path) -> MadeElsewhere | None:
    """The result a plain script saved in `folder` that some scope kind can use (a PEFT adapter), or None."""
    if not folder.is_dir():
        return None
    return next((found for kind in REGISTRY.values() if (found := kind.made_elsewhere(folder)) is not None), None)


def init_source(exp: Experiment, base_fingerprint: str | None = None) -> Path | None:
    """Where the experiment starts from (init_from): a completed run of this scope kind (on this base, when its
    `base_fingerprint` is given), or a result made elsewhere that the kind can start from (a PEFT adapter folder)."""
    from tunelab.models import model_path
    from tunelab.runs import read_manifest, run_status, unfinished

    if exp.init_from is None:
        return None
    source, kind = Path(exp.init_from), get_scope(exp.scope.kind)
    manifest = read_manifest(source) if run_status(source) is not None else None
    if manifest is None:
        found = kind.made_elsewhere(source) if source.is_dir() else None
        if found is not None:
            if found.base and found.base not in (exp.model.id, model_path(exp.model.id)):
                raise ConfigError(
                    f"init_from: '{source}' was trained on '{found.base}' (as its files say), not on model.id "
                    f"'{exp.model.id}'; set model.id: {found.base}, or, if '{exp.model.id}' is a copy of that model, "
                    f"write its path as the base in {source}'s config (PEFT's base_model_name_or_path)"
                )
            return source
        raise ConfigError(
            f"init_from: '{exp.init_from}' is not a tunelab run"
            + ("" if kind.adds_parameters else f" of a {kind.name} scope")
            + (" nor a PEFT adapter folder (adapter_config.json)" if kind.adds_parameters else "")
        )
    if (why := unfinished(Path(source), manifest)) is not None:
        raise ConfigError(f"init_from: run '{source}' {why}")
    theirs = manifest.base_model.fingerprint if manifest.base_model else None
    if base_fingerprint is not None and theirs != base_fingerprint:
        raise ConfigError(
            f"init_from: run '{source}' was trained on another base model (fingerprint {theirs}, "
            f"{manifest.base_model.id if manifest.base_model else None}) than model.id={exp.model.id} "
            f"({base_fingerprint}); point model.id at that run's base"
        )
    theirs_head, own_head = model_head(manifest.method or ""), model_head(exp.method)
    if theirs_head != own_head:
        what = {"lm": "a language model", "score": "a reward model"}
        raise ConfigError(
            f"init_from: run '{source}' trained {what[theirs_head]} ({manifest.method}) and this experiment trains "
            f"{what[own_head]} ({exp.method}), whose heads differ; export the run with `tunelab export {source} --out "
            "FOLDER --merge` and set model.id to that folder to start from it"
        )
    if manifest.scope != exp.scope.kind:
        raise ConfigError(
            f"init_from: run '{source}' trained a {manifest.scope} scope but this experiment's "
            f"scope is {exp.scope.kind}; use the same scope kind"
        )
    return source


def apply_scope(model: nn.Module, scope: Scope, tokenizer=None) -> tuple[nn.Module, ResolvedScope]:
    """Make exactly the scoped parameters trainable (wrapping in PEFT for LoRA) and count them. `tokenizer`: the
    model's, for a scope that names tokens.

    A model that already carries the run's starting point (a trainable adapter loaded for init_from) continues it.
    """
    from tunelab.scope import other_towers, text_root, tied_embeddings

    kind = get_scope(scope.kind)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = tied_embeddings(base)
    towers = other_towers(base)
    total_before = sum(numel(p) for p in model.parameters())
    model, resolved = kind.apply(model, scope, tokenizer)
    if towers:
        depth = text_root(base).count(".") + 1
        parts = sorted({".".join(n.split(".")[:depth]) for n in towers})
        params = dict(base.named_parameters())
        resolved.warnings.append(
            f"{type(base).__name__} is an image-text model: the scope trains its language model on text; "
            f"{', '.join(parts)} ({sum(numel(params[n]) for n in towers):,} parameters) stay frozen"
        )
    resolved.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    resolved.trainable_params = sum(numel(p) for p in model.parameters() if p.requires_grad)
    # New parameters (LoRA) count in the total, as PEFT reports the percentage: of the base plus the adapter.
    resolved.total_params = sum(numel(p) for p in model.parameters()) if kind.adds_parameters else total_before
    resolved.tied_embeddings = tied
    # Then backward runs through every layer, whichever layers the scope names.
    resolved.embeddings_train = any(p.requires_grad for p in model.get_input_embeddings().parameters())
    return model, resolved


def untrained_warning(model: nn.Module, untrained: list[int], tokenizer, scope: Scope) -> str | None:
    """Of the tokens the base never trained (`untrained`, see scope.untrained_tokens), the ones the applied scope
    leaves frozen, as a warning with the setting that trains them; None when there are none (plan and train)."""
    from tunelab.scope import rows_left_frozen, untrained_note

    frozen = tokenizer.convert_ids_to_tokens(rows_left_frozen(model, untrained))
    return untrained_note(frozen, get_scope(scope.kind).token_fix(frozen)) if frozen else None


def numel(parameter) -> int:
    """Parameters as the unquantized model has them: a 4-bit weight is stored packed, two values to a byte."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def run_scope(run_dir: Path, manifest: Manifest, device: str | None = None) -> tuple[ScopeKind, BaseLoader]:
    """A run's scope kind (from its manifest) and how to load its base: the run's own model settings and dtype,
    on `device` (by default the one the run's settings pick here), with the head its method trained."""
    from tunelab.runs import load_run_experiment

    exp = load_run_experiment(run_dir)
    return get_scope(manifest.scope), BaseLoader.pick(exp.model, device, model_head(exp.method))


def attach_runs(model: nn.Module, runs: list[tuple[Path, Manifest]]) -> tuple[nn.Module, dict[str, ScopeKind]]:
    """Every run made available on one loaded base the way its kind goes on it (compare, eval): the model (wrapped
    in PEFT once a LoRA run is attached) in eval mode, and each run's kind by run name."""
    kinds = {m.name: get_scope(m.scope) for _, m in runs}
    for run_dir, m in runs:
        model = kinds[m.name].attach(model, run_dir, m.name)
    return model.eval(), kinds


def checkpoint_run(checkpoint: Path, into: Path) -> tuple[Path, Manifest]:
    """A run's checkpoint as a completed run of its own, <run>@<step> (runs.checkpoint_as_run), with its weights
    where the run's scope kind reads its result. Refused, with the reason, where they are not that kind's result."""
    from tunelab.config import init_moves_base
    from tunelab.runs import checkpoint_as_run, checkpoint_of, complete, load_run_experiment, read_manifest

    if not complete(checkpoint):
        raise TunelabError(
            f"{checkpoint}: a crash cut this checkpoint short (it has no trainer_state.json); give another checkpoint"
        )
    run_dir = checkpoint_of(checkpoint)
    manifest = read_manifest(run_dir)
    kind, scope = get_scope(manifest.scope), load_run_experiment(run_dir).scope
    if scope.lora is not None and init_moves_base(str(scope.lora.init)):
        raise TunelabError(
            f"{checkpoint}: a {scope.lora.init} run's checkpoints hold its adapter as it trains, on weights with the "
            "start taken out of them; only the run's result is converted to LoRA on the base, so compare the run"
        )
    return checkpoint_as_run(checkpoint, into, kind.result, kind.in_checkpoint(Path(checkpoint)))


@contextlib.contextmanager
def checkpoint_views(run_dirs: list[Path]) -> Iterator[dict[Path, Path]]:
    """The checkpoints among `run_dirs` (<run>/checkpoints/checkpoint-<step>), each laid out as a completed run named
    <run>@<step> (checkpoint_run) for the duration of a `with` block: its view's folder -> the checkpoint as given."""
    from tunelab.runs import checkpoint_of

    found = [Path(d) for d in run_dirs if checkpoint_of(Path(d)) is not None]
    if not found:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="tunelab-checkpoints-") as folder:
        yield {checkpoint_run(d, Path(folder) / str(i))[0]: d for i, d in enumerate(found)}


def read_as_runs(run_dirs: list[Path], views: dict[Path, Path]) -> list[Path]:
    """`run_dirs` as a command reads them inside checkpoint_views: each checkpoint by its view, each run as given."""
    shown = {checkpoint: view for view, checkpoint in views.items()}
    return [shown.get(Path(d), Path(d)) for d in run_dirs]


def load_trained(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """The trained model of a completed run: base + adapter, base + trained tensors, or the full weights."""
    from tunelab.runs import read_manifest, unfinished

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if (why := unfinished(run_dir, manifest)) is not None:
        raise TunelabError(f"{run_dir}: run {why}")
    kind, base = run_scope(run_dir, manifest, device)
    return kind.trained(run_dir, base)
