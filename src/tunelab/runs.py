"""Run directories: the resolved experiment, the manifest, metrics and the trained result.

Layout of `<output.dir>/<name>/`:
    experiment.yaml    the fully resolved experiment (every default filled in)
    manifest.json      provenance, status (running | completed | failed | interrupted), results
    metrics.jsonl      one JSON object per logged step and per evaluation
    checkpoints/       Trainer checkpoints, for --resume
    adapter/           LoRA runs: a standard PEFT adapter folder
    trained.safetensors  partial runs: only the trained tensors
    model/             full runs: a standard Transformers folder
    tokenizer/         the tokenizer and chat template actually used
    rewards/           GRPO runs: a copy of each reward file it trains with
    rollouts/          GRPO and distill runs: the replies sampled for each logged step (train-<step>.parquet) and
                       evaluation (eval-<step>.parquet), with their rewards
    train.log          the libraries' logs and warnings while it trained (the terminal shows tunelab's lines)
    lm_eval.json       `tunelab eval` scores, task by task, with the base's beside them
    tensorboard/, wandb/  trackers' local files, when train.report_to names them
Every JSON file is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.config import Experiment
from tunelab.errors import TunelabError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
EXPERIMENT = "experiment.yaml"
CHECKPOINTS = "checkpoints"
ROLLOUTS = "rollouts"
ADAPTER = "adapter"
TRAINED = "trained.safetensors"
FULL_MODEL = "model"
TOKENIZER = "tokenizer"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written stray beside the file
        raise
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


LM_EVAL = "lm_eval.json"


def read_lm_eval(run_dir: Path) -> dict[str, dict]:
    """A run's lm-evaluation-harness results, task by task (`tunelab eval`); empty when never evaluated."""
    path = Path(run_dir) / LM_EVAL
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path}: damaged ({e.msg}, line {e.lineno}); delete it and run tunelab eval again") from e


def write_lm_eval(run_dir: Path, record: dict[str, dict]) -> None:
    write_json(Path(run_dir) / LM_EVAL, record)


def _lm_eval_merged(run_dir: Path, *fields: str) -> list[dict]:
    """Each of `fields` of a run's lm_eval.json merged over its tasks ('task/metric' -> ...); empty where no task
    holds it (a task evaluated before tunelab kept it)."""
    merged: list[dict] = [{} for _ in fields]
    for entry in read_lm_eval(run_dir).values():
        for found, name in zip(merged, fields, strict=True):
            found |= entry.get(name) or {}
    return merged


def lm_eval_docs(run_dir: Path) -> tuple[dict[str, list[list]], dict[str, list[list]], dict[str, bool]]:
    """A run's stored lm-eval values document by document ('task/metric' -> [document, value] pairs: lmeval.docs_of),
    the base's measured beside them, and whether higher is better, by score."""
    docs, base, higher = _lm_eval_merged(run_dir, "docs", "base_docs", "higher_is_better")
    return docs, base, higher


def lm_eval_scores(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """A run's stored lm-eval scores ('task/metric' -> value), and the base's scores measured beside them."""
    scores, base = _lm_eval_merged(run_dir, "scores", "base")
    return scores, base


# ---------------------------------------------------------------- the manifest: a run's typed record


class Record(BaseModel):
    # Keys a newer or older tunelab wrote are kept as they are when the manifest is rewritten.
    model_config = ConfigDict(extra="allow")


class BaseModelRecord(Record):
    id: str
    path: str | None = None
    revision: str | None = None
    fingerprint: str


class DataRecord(Record):
    format: str
    train_examples: int
    eval_examples: int
    hashes: dict[str, str]
    # How training rendered its prompts: "chat" (the chat template) or "text" (plain text: string prompts, no
    # data.as_chat); compare asks the run its prompts the same way. None: recorded before it was.
    rendered: Literal["chat", "text"] | None = None
    # Where the rows came from, with the part taken of each source that gave a sample ("a.jsonl (5,000 of 207,865
    # rows, sampled), b.jsonl"); recorded only then. None: every row of every source, or recorded before it was.
    sampled_from: str | None = None
    # What plan said of the rows: held-out rows that are training rows or ask what one asks, training rows that
    # repeat (data.overlap_warnings). None: nothing, or recorded before it was.
    overlap: list[str] | None = None


class Places(Record):
    count: int
    first: list[str]


class TokensRecord(Record):
    """What the token checks found (templates.TokenChecks.record)."""

    terminator: str | None = None
    terminator_is_eos: bool | None = None
    pad_token: str | None = None
    pad_source: str | None = None
    rows_without_loss: Places | None = None
    rows_all_loss: Places | None = None
    rows_unterminated: Places | None = None
    masking_template: str | None = None
    reads_clock: bool | None = None


class QuantizationRecord(Record):
    bits: int
    type: str
    double_quant: bool
    compute_dtype: str
    describe: str


class ChangeCheck(Record):
    """Which tensors changed in training: every trainable one should, no frozen one may."""

    frozen_changed: list[str]
    trainable_unchanged: list[str]
    trainable_changed: int
    frozen_unchanged: int
    ok: bool


class DistributedRecord(Record):
    world_size: int
    engine: str
    accelerate_config: str | None = None
    accelerate_config_hash: str | None = None
    rank_digests: list[str]


class Provenance(Record):
    """What a run is made of, known before it trains: recorded first, and compared on --resume."""

    base_model: BaseModelRecord
    init_from: str | None = None
    data: DataRecord
    chat_template_hash: str | None = None
    tokens: TokensRecord | None = None
    reward_hashes: dict[str, str] | None = None  # GRPO: each reward's file (sha256 prefix), by grpo.rewards' name
    tool_hashes: dict[str, str] | None = None  # GRPO: each tool's file (sha256 prefix), by grpo.tools' name
    teacher: BaseModelRecord | None = None  # distill: the model that taught (a run's folder, or a model's id)
    processes: int | None = None  # how many processes train it (the world size): each takes batch_size a step


class Manifest(Record):
    """A run's record (manifest.json): read and written only here, typed everywhere else."""

    name: str
    status: Literal["running", "completed", "failed", "interrupted"]
    experiment: str | None = None
    config_hash: str | None = None
    method: str | None = None
    scope: str | None = None
    quantization: QuantizationRecord | None = None
    created_at: str | None = None
    started_at: str | None = None
    resumed_at: str | None = None
    ended_at: str | None = None
    error: str | None = None
    forced_resume: list[str] | None = None
    checkpoints_pruned: dict[str, Any] | None = None  # `tunelab prune`: when, which checkpoints, how many bytes
    resumed_with: list[str] | None = None  # settings of how it runs (HOW_IT_RUNS) that a resume changed
    versions: dict[str, str] = {}
    seed: int | None = None
    # provenance
    base_model: BaseModelRecord | None = None
    init_from: str | None = None
    data: DataRecord | None = None
    chat_template_hash: str | None = None
    tokens: TokensRecord | None = None
    reward_hashes: dict[str, str] | None = None
    tool_hashes: dict[str, str] | None = None
    teacher: BaseModelRecord | None = None
    processes: int | None = None
    # how it trains
    device: str | None = None
    dtype: str | None = None
    gradient_checkpointing: bool | None = None
    batching: dict[str, Any] | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    target_modules: list[str] | None = None
    layers: list[int] | None = None
    adapter: str | None = None  # a LoRA scope's form in words, as plan shows it (rank, alpha, scale, variants)
    scope_notes: list[str] | None = None  # what the scope decided beyond the experiment file (frozen towers, ...)
    estimated_memory_bytes: int | None = None
    reference: str | None = None
    ref_logps_cache: str | None = None
    ref_logps_reused: bool | None = None
    preference_accuracy_before: float | None = None
    # results
    result: str | None = None
    base_eval_loss: float | None = None
    final_eval_loss: float | None = None
    # data.eval_also's sets: name -> {"base": loss before the first step, "final": the result's}
    eval_also_losses: dict[str, dict[str, float | None]] | None = None
    final_train_loss: float | None = None
    global_steps: int | None = None
    max_steps: int | None = None  # the optimizer steps the Trainer set out to take, recorded as training begins
    stopped_early: bool | None = None  # train.early_stop ended it before its planned steps
    best_step: int | None = None  # train.keep: best: the step whose checkpoint is the result
    best_eval_loss: float | None = None
    # GRPO: the mean reward of completions sampled for the eval prompts, before the first step and of the result
    base_eval_reward: float | None = None
    final_eval_reward: float | None = None
    train_seconds: float | None = None
    train_runtime: float | None = None
    tokens_seen: int | None = None
    change_check: ChangeCheck | None = None
    preference_accuracy_after: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_measure: str | None = None  # what peak_memory_bytes counts (train.peak_memory)
    distributed: DistributedRecord | None = None

    @property
    def terminator(self) -> str | None:
        return self.tokens.terminator if self.tokens else None

    @property
    def result_step(self) -> int | None:
        """The step whose weights are the result: the best checkpoint's with train.keep: best, else the last step."""
        return self.best_step if self.best_step is not None else self.global_steps

    @property
    def quantized(self) -> str:
        return self.quantization.describe if self.quantization else "unquantized"

    def updated(self, **fields: Any) -> Manifest:
        return Manifest.model_validate({**self.model_dump(), **fields})


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    write_json(Path(run_dir) / MANIFEST, manifest.model_dump(mode="json"))


def run_status(run_dir: Path) -> str | None:
    """The status of the run in `run_dir`, or None where there is no run."""
    return read_manifest(run_dir).status if (Path(run_dir) / MANIFEST).is_file() else None


def read_manifest(run_dir: Path) -> Manifest:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise TunelabError(f"{run_dir}: not a tunelab run (no {MANIFEST})")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the file"
        raise TunelabError(f"{path}: unreadable ({where}: {first['msg']}); the run's record is damaged") from e


def versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers
    import trl

    import tunelab

    return {
        "tunelab": tunelab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        **_optional_versions(),
    }


def _optional_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("bitsandbytes",):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def quantization_record(exp: Experiment) -> QuantizationRecord | None:
    """The base's quantization as the manifest records it: the settings and their one-line description."""
    q = exp.model.quantization
    return QuantizationRecord(**q.model_dump(mode="json"), describe=q.describe()) if q else None


@dataclass
class Run:
    dir: Path
    manifest: Manifest
    resuming: bool
    writable: bool = True  # False on every process but the first of a multi-process run
    lock_fd: int | None = None  # held while this process trains the run
    created: bool = False  # this call made the folder (a fresh run, not a resume)
    began: bool = False  # the first training step started; before that a failure leaves no run behind

    def close(self) -> None:
        """Release the run's lock (the OS releases it too when the process dies)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def update(self, **fields: Any) -> None:
        self.manifest = self.manifest.updated(**fields)
        if self.writable:
            write_manifest(self.dir, self.manifest)

    def log_metrics(self, record: dict) -> None:
        if self.writable:
            with open(self.dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def trim_after(self, up_to_step: int) -> None:
        """On resume, drop the metrics and kept replies (rollouts/) logged after the checkpoint (training repeats
        those steps). Only the writing process touches them: another rank rewriting the metrics at the same moment
        could empty the file."""
        if not self.writable:
            return
        kept = [r for r in read_metrics(self.dir) if r.get("step", 0) <= up_to_step]
        write_atomic(self.dir / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        for rollout in (self.dir / ROLLOUTS).glob("*.parquet"):  # train-<step>.parquet, eval-<step>.parquet
            if int(rollout.stem.rpartition("-")[2]) > up_to_step:
                rollout.unlink()

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS


def latest_rollouts(run_dir: Path, kind: str = "train") -> tuple[Path, list[dict]] | None:
    """The replies a sampling run (GRPO, distill) kept for its latest logged step (`kind` train) or evaluation (eval):
    the file and its rows (step, prompt, completion, each reward, advantage); None where it kept none."""
    import pyarrow.parquet as pq

    kept = sorted((run_dir / ROLLOUTS).glob(f"{kind}-*.parquet"))
    return (kept[-1], pq.read_table(kept[-1]).to_pylist()) if kept else None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint folder (checkpoint-<step>) was saved at."""
    return int(checkpoint.name.removeprefix("checkpoint-"))


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first."""
    folder = run_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return sorted(found, key=checkpoint_step)


def complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished writing a checkpoint: it writes trainer_state.json after the weights,
    optimizer and scheduler, so a readable one marks a checkpoint a crash did not cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    has_optimizer = any(p.name.startswith("optimizer") for p in checkpoint.iterdir())
    if not (has_optimizer and (checkpoint / "scheduler.pt").is_file()):
        raise TunelabError(
            f"{checkpoint}: has no optimizer or scheduler state, so resuming would restart AdamW and the learning "
            "rate from zero; remove this checkpoint folder to resume from an earlier one, or use --overwrite"
        )
    return True


def checkpoint_of(folder: Path) -> Path | None:
    """The run a Trainer checkpoint folder (<run>/checkpoints/checkpoint-<step>) belongs to; None for any other."""
    folder = Path(folder)
    if folder.parent.name != CHECKPOINTS or not folder.name.removeprefix("checkpoint-").isdigit():
        return None
    run_dir = folder.parent.parent
    return run_dir if run_status(run_dir) is not None else None


# What a checkpoint's view takes from its own files, not its run's: the run's later results are not the checkpoint's.
NOT_THE_CHECKPOINTS = (MANIFEST, METRICS, LM_EVAL, CHECKPOINTS, ROLLOUTS)
# The manifest's records of what the whole run did or measured at its end, none of them the checkpoint's.
AFTER_CHECKPOINT = (
    "ended_at", "error", "checkpoints_pruned", "eval_also_losses", "stopped_early", "best_step", "best_eval_loss",
    "final_eval_reward", "train_seconds", "train_runtime", "tokens_seen", "change_check", "preference_accuracy_after",
    "peak_memory_bytes", "peak_memory_measure",
)  # fmt: skip


def checkpoint_as_run(checkpoint: Path, into: Path, result: str, weights: Path) -> tuple[Path, Manifest]:
    """A run's complete checkpoint laid out in `into` as a completed run of its own, named <run>@<step>, for a
    command to use as it uses any run: `result` (the name the run's scope kind reads its result under) links to the
    checkpoint's `weights`; the manifest is the run's with the results at that step (its last logged train loss, its
    eval loss where one was logged at that step, nothing of what came after); the metrics are the run's up to that
    step; its lm-eval scores are those `tunelab eval` kept in the checkpoint; every other file (experiment, tokenizer,
    reward files) links to the run's. Nothing in the run is written."""
    run_dir = Path(checkpoint).parent.parent
    manifest, step = read_manifest(run_dir), checkpoint_step(checkpoint)
    view = Path(into) / f"{manifest.name}@{step}"
    view.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name not in (*NOT_THE_CHECKPOINTS, result):
            (view / entry.name).symlink_to(entry.resolve())
    (view / result).symlink_to(Path(weights).resolve())
    if (Path(checkpoint) / LM_EVAL).is_file():  # `tunelab eval` of the checkpoint keeps its scores in it
        (view / LM_EVAL).symlink_to((Path(checkpoint) / LM_EVAL).resolve())
    metrics = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_atomic(view / METRICS, "".join(json.dumps(r) + "\n" for r in metrics))
    losses = [r["loss"] for r in metrics if "loss" in r]
    measure = held_out_measure(metrics)
    evals = [r[measure] for r in metrics if measure in r and r["step"] == step]
    held_out = {"final_eval_loss": None} | ({f"final_{measure}": evals[-1]} if evals else {})
    at_step = manifest.updated(
        **dict.fromkeys(AFTER_CHECKPOINT) | held_out,
        name=view.name,
        status="completed",
        global_steps=step,
        final_train_loss=losses[-1] if losses else None,
    )
    write_manifest(view, at_step)
    return view, at_step


def other_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints a completed run keeps besides the one its result is (Manifest.result_step: the last
    step's, or with train.keep: best, the best one's); none for a folder that is no completed run."""
    if run_status(run_dir) != "completed":
        return []
    result = read_manifest(run_dir).result_step
    return [c for c in checkpoints(run_dir) if checkpoint_step(c) != result and complete(c)]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; ones a crash cut short are passed over."""
    return next((c for c in reversed(checkpoints(run_dir)) if complete(c)), None)


def resume_hint(run_dir: Path) -> str:
    """Where an unfinished run goes on from, said where it stopped and where it is shown."""
    checkpoint = last_checkpoint(run_dir)
    start = f"{checkpoint.name} (step {checkpoint_step(checkpoint)})" if checkpoint else "its start (no checkpoint yet)"
    return f"the same tunelab train command with --resume continues from {start}"


NOT_HASHED = "hub-or-folder"  # what runs recorded for folders and hub datasets before their records were hashed


def changed_sources(recorded: dict[str, str] | None, now: dict[str, str] | None) -> list[str]:
    """The data sources whose digest differs from the one a run recorded (a source recorded as not hashed is not known
    to have changed); none where either side has no digests."""
    if not recorded or not now:
        return []
    return sorted(k for k in {*recorded, *now} if recorded.get(k) not in (now.get(k), NOT_HASHED))


# Settings that change how a run computes, not what it computes (up to float rounding): a resume may change them,
# after running out of memory for instance, and goes on as the same experiment; the manifest records the change.
HOW_IT_RUNS = frozenset(
    {
        "model.attn_implementation",
        "train.gradient_checkpointing",
        "train.micro_batch_size",
        "train.pin_memory",
        "train.data_workers",
        "train.compile",
        "train.logging_steps",
        "train.eval_steps",
        "train.save_steps",
        "train.save_minutes",
        "train.save_total_limit",
        "train.report_to",
        "output.dir",  # the run was found there: the same folder, written another way
    }
)


def setting_changes(recorded: dict, exp: Experiment) -> dict[str, tuple[Any, Any]]:
    """The settings whose values differ between a run's recorded experiment (its experiment.yaml) and `exp`, by
    dotted path; a setting the record lacks (written before it existed) is taken at its default."""
    from tunelab.config import LATER_SETTINGS

    def flat(value: Any, path: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items() for k, v in flat(item, (*path, key)).items()}
        return {path: value}

    old, new = flat(recorded, ()), flat(exp.model_dump(mode="json"), ())
    changes = {}
    for path in sorted({*old, *new}):
        before = old.get(path, LATER_SETTINGS.get(path))
        if before != new.get(path):
            changes[".".join(path)] = (before, new.get(path))
    return changes


def changed_inputs(
    old: Manifest, exp: Experiment, provenance: Provenance | None, recorded: dict | None = None
) -> list[str]:
    """What differs between a run's recorded inputs and this attempt's: experiment, data, template, base weights.
    `recorded`: the run's experiment as it recorded it; with it the changed settings are named, and those that
    change only how the run computes (HOW_IT_RUNS) are not changes."""
    changed = []
    if old.config_hash != exp.config_hash():
        if recorded is None:
            changed.append(f"the experiment changed (config hash {old.config_hash} -> {exp.config_hash()})")
        else:
            named = [
                f"{k} {a!r} -> {b!r}" for k, (a, b) in setting_changes(recorded, exp).items() if k not in HOW_IT_RUNS
            ]
            if named:
                changed.append(f"the experiment changed ({', '.join(named)})")
    if provenance is None:
        return changed
    if files := changed_sources(old.data.hashes if old.data else None, provenance.data.hashes):
        changed.append(f"the data changed ({', '.join(files)})")
    old_template, new_template = old.chat_template_hash, provenance.chat_template_hash
    if old_template and new_template and old_template != new_template:
        changed.append("the chat template changed")
    if old.reward_hashes and provenance.reward_hashes and old.reward_hashes != provenance.reward_hashes:
        rewards = sorted(k for k, v in provenance.reward_hashes.items() if old.reward_hashes.get(k) != v)
        changed.append(f"the reward functions changed ({', '.join(rewards)})")
    if old.tool_hashes != provenance.tool_hashes and (old.tool_hashes or provenance.tool_hashes):
        new_tools, old_tools = provenance.tool_hashes or {}, old.tool_hashes or {}
        tools = sorted(k for k in {*new_tools, *old_tools} if old_tools.get(k) != new_tools.get(k))
        changed.append(f"the tools changed ({', '.join(tools)})")
    if old.teacher and provenance.teacher and old.teacher.fingerprint != provenance.teacher.fingerprint:
        changed.append(
            f"the teacher changed ({old.teacher.id} {old.teacher.fingerprint} -> {provenance.teacher.id} "
            f"{provenance.teacher.fingerprint})"
        )
    if old.processes and provenance.processes and old.processes != provenance.processes:
        changed.append(
            f"the number of processes changed ({old.processes} -> {provenance.processes}): each takes "
            f"train.batch_size examples a step, so the steps left would train other examples; resume it with "
            f"{old.processes} process{'es' * (old.processes > 1)}"
        )
    old_base = old.base_model.fingerprint if old.base_model else None
    new_base = provenance.base_model.fingerprint
    if old_base and new_base and old_base != new_base:
        changed.append(f"the base model's weights changed (fingerprint {old_base} -> {new_base})")
    return changed


def open_run(
    exp: Experiment,
    resume: bool,
    overwrite: bool,
    main_process: bool = True,
    provenance: Provenance | None = None,
    force: bool = False,
) -> Run:
    """Create the run directory, or reopen it for --resume; never clobber a run without --overwrite.

    In a multi-process run only the main process touches the directory; the others get a read-only view.
    """
    run_dir = Path(exp.output.dir) / exp.run_name
    if not main_process:
        return Run(
            run_dir,
            Manifest(name=exp.run_name, status="running", config_hash=exp.config_hash()),
            resuming=resume and last_checkpoint(run_dir) is not None,
            writable=False,
        )
    lock_fd = lock_run(Path(exp.output.dir), exp.run_name)
    try:
        run = _open(exp, run_dir, resume, overwrite, provenance, force)
    except BaseException:
        os.close(lock_fd)
        raise
    run.lock_fd = lock_fd
    return run


def last_logged(metrics: list[dict]) -> int | None:
    """The last training step a run's metrics logged a loss at."""
    return next((r["step"] for r in reversed(metrics) if "loss" in r and "step" in r), None)


def _last_logged_step(run_dir: Path) -> int | None:
    try:
        return last_logged(read_metrics(run_dir))
    except TunelabError:  # a damaged metrics file: the listing goes on without the step
        return None


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / f".{Path(run_dir).name}.lock"


def lock_run(output_dir: Path, name: str) -> int:
    """One writer per run: an OS lock beside the run folder (it survives --overwrite), held for the training's
    life and released by the OS when the holder dies, so it is never stale."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(output_dir / name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise TunelabError(
            f"{output_dir / name}: {f'process {pid}' if pid else 'another process'} is training this run now; wait "
            "for it, or use --name to start another run"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def trained_now(run_dir: Path) -> bool | None:
    """Whether a process holds the run's lock, training it now; None where that cannot be told (no lock file, or a
    file system without locks). The probe takes a shared lock and lets go at once."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


DIED = "died"  # shown, never recorded (shown_status)


def shown_status(run_dir: Path, manifest: Manifest) -> str:
    """The run's status as recorded, except "died" for a run recorded as running that no process trains: it was
    killed (SIGKILL, the out-of-memory killer) or its machine stopped, with no chance to record it."""
    if manifest.status == "running" and trained_now(run_dir) is False:
        return DIED
    return manifest.status


def unfinished(run_dir: Path, manifest: Manifest) -> str | None:
    """Why a command that needs a completed run cannot use this one, and what finishes it; None when completed."""
    status = shown_status(run_dir, manifest)
    if status == "completed":
        return None
    said = {"running": "is running", "interrupted": "was interrupted", "failed": "failed", DIED: "died"}
    advice = "wait for it to finish" if status == "running" else resume_hint(run_dir)
    return f"{said.get(status, 'is ' + status)}, not completed; {advice}"


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds (or will hold) `folder`; None where it cannot be measured."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def folder_bytes(folder: Path) -> int:
    """What a folder's files take (links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        total += sum((Path(root) / f).lstat().st_size for f in files)
    return total


def check_prunable(run_dir: Path) -> None:
    """Only a completed run's checkpoints may go: a run that is not completed continues from them (`--resume`)."""
    if (why := unfinished(run_dir, read_manifest(run_dir))) is not None:
        raise TunelabError(
            f"{run_dir}: run {why}; nothing was removed, since --resume goes on from its checkpoints: finish it, or "
            "leave it out"
        )


def prune_checkpoints(run_dir: Path, dry_run: bool = False) -> tuple[list[str], int, list[str]]:
    """Remove a completed run's Trainer checkpoints, the run's earlier steps: a resume reads them, and compare, chat,
    eval, export and show where one is named (init_from reads the result). Returns the checkpoints removed (or that
    would be), their bytes, and those of them that held lm-eval scores (`tunelab eval` of a checkpoint)."""
    run_dir = Path(run_dir)
    check_prunable(run_dir)
    manifest = read_manifest(run_dir)
    folder = run_dir / CHECKPOINTS
    kept = checkpoints(run_dir)
    names = [c.name for c in kept]
    scored = [c.name for c in kept if (c / LM_EVAL).is_file()]
    size = folder_bytes(folder) if folder.is_dir() else 0
    if dry_run or not folder.is_dir():
        return names, size, scored
    lock = lock_run(run_dir.parent, run_dir.name)  # not while a --overwrite retrains it
    try:
        _refuse_links(run_dir)
        shutil.rmtree(folder)
        pruned = {"at": now(), "checkpoints": names, "bytes": size}
        write_manifest(run_dir, manifest.updated(checkpoints_pruned=pruned))
    finally:
        os.close(lock)
    return names, size, scored


def _refuse_links(run_dir: Path) -> None:
    """tunelab writes only into real files of the run folder: a symbolic link could send writes elsewhere."""
    if run_dir.is_symlink():
        raise TunelabError(f"{run_dir}: is a symbolic link; a run folder must be a real folder inside output.dir")
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.is_symlink():
                raise TunelabError(f"{entry}: is a symbolic link inside the run folder; remove it")


def _open(
    exp: Experiment, run_dir: Path, resume: bool, overwrite: bool, provenance: Provenance | None, force: bool
) -> Run:
    _refuse_links(run_dir)
    manifest_path = run_dir / MANIFEST
    if run_dir.exists() and not manifest_path.is_file() and any(run_dir.iterdir()):
        raise TunelabError(f"{run_dir}: exists and is not a tunelab run; choose another --name or output.dir")
    if manifest_path.is_file():
        old = read_manifest(run_dir)
        status = old.status
        if overwrite:
            if old.name != exp.run_name or run_dir.resolve().parent != Path(exp.output.dir).resolve():
                raise TunelabError(f"{run_dir}: holds a run named {old.name!r}; --overwrite replaces only its own run")
            shutil.rmtree(run_dir)
        elif resume:
            if status == "completed":
                raise TunelabError(f"{run_dir}: already completed; nothing to resume (use --overwrite to retrain)")
            recorded = _recorded_experiment(run_dir)
            changed = changed_inputs(old, exp, provenance, recorded)
            if changed and not force:
                raise TunelabError(
                    f"{run_dir}: since this run started, {'; '.join(changed)}; resuming would mix two experiments: "
                    "use --name for a new run, or --force to continue anyway"
                )
            adjusted = [
                f"{k}: {a!r} -> {b!r}"
                for k, (a, b) in (setting_changes(recorded, exp) if recorded is not None else {}).items()
                if k in HOW_IT_RUNS
            ]
            reopened = old.updated(
                status="running",
                resumed_at=now(),
                error=None,
                forced_resume=changed or None,
                resumed_with=[*(old.resumed_with or []), *adjusted] or None,
            )
            if adjusted and not changed:  # the same experiment, run another way from here: recorded as it now runs
                reopened = reopened.updated(config_hash=exp.config_hash())
                write_atomic(run_dir / EXPERIMENT, yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
            run = Run(run_dir, reopened, resuming=last_checkpoint(run_dir) is not None)
            if not run.resuming:  # it died before its first checkpoint: start over, without its metrics
                (run_dir / METRICS).unlink(missing_ok=True)
            write_manifest(run_dir, reopened)
            return run
        elif status == "completed":
            raise TunelabError(
                f"{run_dir}: a completed run is already there; use --overwrite to replace it or --name to keep both"
            )
        else:
            raise TunelabError(
                f"{run_dir}: a {status} run is already there; use --resume to continue it, "
                "--overwrite to replace it, or --name to start another"
            )
    elif resume:
        raise TunelabError(f"{run_dir}: no run to resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS).unlink(missing_ok=True)
    write_atomic(run_dir / EXPERIMENT, yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
    manifest = Manifest(
        name=exp.run_name,
        experiment=exp.name,
        status="running",
        config_hash=exp.config_hash(),
        method=exp.method,
        scope=exp.scope.kind,
        quantization=quantization_record(exp),
        created_at=now(),
        started_at=now(),
        versions=versions(),
        seed=exp.train.seed,
    )
    run = Run(run_dir, manifest, resuming=False, created=True)
    write_manifest(run_dir, manifest)
    return run


def _recorded_experiment(run_dir: Path) -> dict | None:
    """A run's experiment.yaml as written (None when missing or unreadable: then only its hash is compared)."""
    try:
        recorded = yaml.safe_load((run_dir / EXPERIMENT).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) else None


def load_run_experiment(run_dir: Path) -> Experiment:
    return Experiment.model_validate(yaml.safe_load((Path(run_dir) / EXPERIMENT).read_text()))


def held_out_measure(metrics: list[dict]) -> str:
    """The metric a run's evaluations measure it by: eval_reward for GRPO (the mean reward of replies sampled for the
    held-out prompts; its eval_loss is the policy loss, no measure of the replies), else eval_loss."""
    return "eval_reward" if any("eval_reward" in r for r in metrics) else "eval_loss"


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's logged metrics. A last line cut short (the disk filled, or the process died, while it was appended)
    is left out; a damaged line before it is an error."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise TunelabError(f"{path}: line {i} is damaged ({e.msg}); delete that line") from e
    return records


def list_runs(root: Path, name: str | None = None, status: str | None = None, base: str | None = None) -> list[dict]:
    """Summaries of every run under `root` (studies nest one level deeper), newest first; `name` (a shell
    pattern), `status` and `base` (part of the base model's id) keep only the runs that match."""
    import fnmatch

    rows = [
        r
        for r in _summaries(root)
        if (name is None or fnmatch.fnmatchcase(r["name"] or "", name))
        and (status is None or r["status"] == status)
        and (base is None or base in (r.get("base") or ""))
    ]
    return sorted(rows, key=lambda r: r["created_at"] or "", reverse=True)


def _summaries(root: Path) -> list[dict]:
    rows = []
    for manifest_path in sorted(Path(root).glob("**/manifest.json")):
        run_dir = manifest_path.parent
        if len(run_dir.relative_to(root).parts) > 3 or CHECKPOINTS in run_dir.parts:
            continue
        try:
            m = read_manifest(run_dir)
        except TunelabError:
            rows.append({"name": run_dir.name, "dir": str(run_dir), "status": "unreadable", "created_at": None})
            continue
        rows.append(
            {
                "name": m.name,
                "dir": str(run_dir),
                "status": shown_status(run_dir, m),
                "method": m.method,
                "scope": m.scope,
                "base": m.base_model.id if m.base_model else None,
                "quantization": m.quantization.describe if m.quantization else None,
                "target_modules": m.target_modules,
                "layers": m.layers,
                "trainable_percent": m.trainable_percent,
                "final_train_loss": m.final_train_loss,
                "eval_loss": m.final_eval_loss,
                "eval_reward": m.final_eval_reward,
                "eval_also_losses": {name: losses.get("final") for name, losses in (m.eval_also_losses or {}).items()},
                "train_seconds": m.train_seconds,
                "created_at": m.created_at,
                # how far an unfinished run got: its last logged step, of how many
                "logged_step": _last_logged_step(run_dir) if m.status != "completed" else None,
                "max_steps": m.max_steps,
                "disk_bytes": folder_bytes(run_dir),
            }
        )
    return rows
