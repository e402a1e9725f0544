"""The teacher of on-policy distillation (`distill.teacher`): a model by hub id or folder, or a completed tunelab
run's trained model (its base with its adapter merged, or its trained weights).

`plan` reads the teacher's config alone (its size, its vocabulary) and its tokenizer where it has one; `train`
loads it and records what it was (its id and a fingerprint of its weights), so a resume with another teacher is
refused like one with other data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Experiment, ModelSettings, model_head
from tunelab.errors import ConfigError
from tunelab.templates import template_hash

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.runs import BaseModelRecord

KEY = "distill.teacher"


@dataclass(frozen=True)
class Teacher:
    spec: str  # as the experiment names it (a local path made absolute)
    run: Path | None  # a tunelab run whose trained model teaches
    settings: ModelSettings  # the model that loads: the teacher itself, or the run's base

    @property
    def label(self) -> str:
        return f"run {self.run.name}" if self.run is not None else short_name(self.spec)


def short_name(spec: str) -> str:
    """How plan names a teacher: a local folder by its name, a hub id as it is."""
    return Path(spec).name if Path(spec).is_absolute() else spec


def resolve_teacher(exp: Experiment) -> Teacher:
    """Which model teaches: a completed run (by its manifest), which loads as it trained, or a model id, which loads
    as the student's model settings say (dtype, device, attention, trust_remote_code), quantized only where
    distill.teacher_quantization says."""
    from tunelab.runs import load_run_experiment, read_manifest, run_status, unfinished

    assert exp.distill is not None
    spec, path = exp.distill.teacher, Path(exp.distill.teacher)
    if run_status(path) is not None:
        manifest = read_manifest(path)
        if (why := unfinished(path, manifest)) is not None:
            raise ConfigError(f"{KEY}: run '{spec}' {why}, or name another")
        if model_head(manifest.method or "") != "lm":
            raise ConfigError(
                f"{KEY}: run '{spec}' is a reward model (method: {manifest.method}), which scores replies and predicts "
                "no tokens; name a model or a run that generates"
            )
        if exp.distill.teacher_quantization is not None:
            raise ConfigError(
                f"distill.teacher_quantization: the run '{spec}' teaches as it trained; export it with "
                f"`tunelab export {spec} --out FOLDER --merge` and name that folder as the teacher to quantize it"
            )
        return Teacher(spec, path, load_run_experiment(path).model)
    d = exp.distill
    own = exp.model.model_copy(
        update={"id": spec, "revision": d.teacher_revision, "quantization": d.teacher_quantization}
    )
    return Teacher(spec, None, own)


# The model loaders' refusals name the student's keys; for the teacher, its own.
TEACHER_KEYS = {"model.id": KEY, "model.quantization": "distill.teacher_quantization"}


@contextlib.contextmanager
def as_teacher_errors() -> Iterator[None]:
    """The model loaders' refusals, naming the teacher's keys."""
    try:
        yield
    except ConfigError as e:
        for student, teacher in TEACHER_KEYS.items():
            if str(e).startswith(student + ":"):
                raise ConfigError(str(e).replace(student, teacher)) from e
        raise


def teacher_config(teacher: Teacher) -> PretrainedConfig:
    from tunelab.models import load_config

    with as_teacher_errors():
        return load_config(teacher.settings)


def check_teacher(
    teacher: Teacher, config: PretrainedConfig, student: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> list[str]:
    """Refuse a teacher whose next-token distributions are not over the student's tokens: another vocabulary size
    (TRL compares the two heads' logits position by position), or a tokenizer that gives tokens other ids. Returns
    the warnings: a teacher whose own chat template is another than the student's reads the student's rendering."""
    theirs, ours = config.get_text_config().vocab_size, student.get_text_config().vocab_size
    if theirs != ours:
        raise ConfigError(
            f"{KEY}: '{teacher.label}' predicts over {theirs} token ids and the student over {ours}; distillation "
            "compares the two distributions id by id, so the teacher must share the student's vocabulary (a model "
            "of the same family and tokenizer, with embeddings of the same size)"
        )
    other = _teacher_tokenizer(teacher)
    if tokenizer is None or other is None:
        return []
    vocab, their_vocab = tokenizer.get_vocab(), other.get_vocab()
    moved = sorted((i, t) for t, i in vocab.items() if their_vocab.get(t) != i)
    if moved:
        i, token = moved[0]
        raise ConfigError(
            f"{KEY}: '{teacher.label}' has another tokenizer: {len(moved)} of the student's {len(vocab)} tokens have "
            f"other ids there (token {token!r} is {i} here, {their_vocab.get(token)} there); the teacher must share "
            "the student's tokenizer"
        )
    theirs_template, ours_template = template_hash(other.chat_template), template_hash(tokenizer.chat_template)
    if theirs_template and ours_template and theirs_template != ours_template:
        return [
            f"{KEY}: '{teacher.label}' has a chat template of its own ({theirs_template}) other than the student's "
            f"({ours_template}); the teacher reads the prompts and replies as the student's template renders them, "
            "which it may not have been trained on"
        ]
    return []


def _teacher_tokenizer(teacher: Teacher) -> PreTrainedTokenizerBase | None:
    """The tokenizer the teacher was trained with: a run's own copy, or the model's; None where it has none."""
    from tunelab.models import auto_tokenizer, has_tokenizer, model_path

    source = str(teacher.run / "tokenizer") if teacher.run else model_path(teacher.settings.id)
    if not has_tokenizer(source):
        return None
    try:
        return auto_tokenizer(
            source,
            revision=None if teacher.run else teacher.settings.revision,
            trust_remote_code=teacher.settings.trust_remote_code,
        )
    except (OSError, ValueError):  # none to read here (a hub id offline): TRL's own vocabulary check remains
        return None


def load_teacher(teacher: Teacher, device: str) -> PreTrainedModel:
    """The teacher's weights on `device`, frozen, in eval mode; a LoRA run's adapter merged into its base."""
    from peft import PeftModel

    from tunelab.models import load_model, pick_dtype
    from tunelab.scopes import load_trained

    with as_teacher_errors():
        if teacher.run is not None:
            model = load_trained(teacher.run, device)
            if isinstance(model, PeftModel):
                model = model.merge_and_unload()
        else:
            model = load_model(teacher.settings, pick_dtype(teacher.settings.dtype, device), device)
    model.requires_grad_(False)
    return model.eval()


def teacher_record(teacher: Teacher, shown: bool = False) -> BaseModelRecord:
    """What taught: a model's id and the fingerprint of its weights (downloaded first where they are missing, the
    download on the terminal when `shown`), or a run's folder and a fingerprint of its base and its trained files (a
    run retrained in place is another teacher)."""
    from tunelab.models import fingerprint, run_fingerprint, weights_path
    from tunelab.runs import BaseModelRecord

    if teacher.run is None:
        with as_teacher_errors():
            source = weights_path(teacher.settings, shown)
        return BaseModelRecord(
            id=teacher.spec, path=source, revision=teacher.settings.revision,
            fingerprint=fingerprint(source, teacher.settings.revision),
        )  # fmt: skip
    return BaseModelRecord(id=teacher.spec, path=str(teacher.run.resolve()), fingerprint=run_fingerprint(teacher.run))
