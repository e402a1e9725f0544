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
from typing import Any

import yaml

from tunelab.config import Experiment
from tunelab.errors import TunelabError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
EXPERIMENT = "experiment.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TRAINED = "trained.safetensors"
FULL_MODEL = "model"
TOKENIZER = "tokenizer"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise TunelabError(f"{run_dir}: not a tunelab run (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TunelabError(f"{path}: unreadable ({e}); the run's record is damaged") from e
    if not isinstance(manifest, dict):
        raise TunelabError(f"{path}: unreadable (not a JSON object); the run's record is damaged")
    return manifest


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


def quantization_record(exp: Experiment) -> dict | None:
    """The base's quantization as the manifest records it: the settings and their one-line description."""
    q = exp.model.quantization
    return {**q.model_dump(mode="json"), "describe": q.describe()} if q else None


@dataclass
class Run:
    dir: Path
    manifest: dict
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
        self.manifest.update(fields)
        if self.writable:
            write_json(self.dir / MANIFEST, self.manifest)

    def log_metrics(self, record: dict) -> None:
        if self.writable:
            with open(self.dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS


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


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; ones a crash cut short are passed over."""
    return next((c for c in reversed(checkpoints(run_dir)) if complete(c)), None)


def changed_inputs(old: dict, exp: Experiment, provenance: dict) -> list[str]:
    """What differs between a run's recorded inputs and this attempt's: experiment, data, template, base weights."""
    changed = []
    if old.get("config_hash") != exp.config_hash():
        changed.append(f"the experiment changed (config hash {old.get('config_hash')} -> {exp.config_hash()})")
    old_data, new_data = (old.get("data") or {}).get("hashes"), (provenance.get("data") or {}).get("hashes")
    if old_data and new_data and old_data != new_data:
        files = sorted(k for k in {*old_data, *new_data} if old_data.get(k) != new_data.get(k))
        changed.append(f"the data changed ({', '.join(files)})")
    old_template, new_template = old.get("chat_template_hash"), provenance.get("chat_template_hash")
    if old_template and new_template and old_template != new_template:
        changed.append("the chat template changed")
    old_base = (old.get("base_model") or {}).get("fingerprint")
    new_base = (provenance.get("base_model") or {}).get("fingerprint")
    if old_base and new_base and old_base != new_base:
        changed.append(f"the base model's weights changed (fingerprint {old_base} -> {new_base})")
    return changed


def open_run(
    exp: Experiment,
    resume: bool,
    overwrite: bool,
    main_process: bool = True,
    provenance: dict | None = None,
    force: bool = False,
) -> Run:
    """Create the run directory, or reopen it for --resume; never clobber a run without --overwrite.

    In a multi-process run only the main process touches the directory; the others get a read-only view.
    """
    run_dir = Path(exp.output.dir) / exp.run_name
    if not main_process:
        return Run(
            run_dir,
            {"config_hash": exp.config_hash()},
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


def lock_run(output_dir: Path, name: str) -> int:
    """One writer per run: an OS lock beside the run folder (it survives --overwrite), held for the training's
    life and released by the OS when the holder dies, so it is never stale."""
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise TunelabError(
            f"{output_dir / name}: process {holder} is training this run now; wait for it, or use --name "
            "to start another run"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _refuse_links(run_dir: Path) -> None:
    """tunelab writes only into real files of the run folder: a symbolic link could send writes elsewhere."""
    if run_dir.is_symlink():
        raise TunelabError(f"{run_dir}: is a symbolic link; a run folder must be a real folder inside output.dir")
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.is_symlink():
                raise TunelabError(f"{entry}: is a symbolic link inside the run folder; remove it")


def _open(exp: Experiment, run_dir: Path, resume: bool, overwrite: bool, provenance: dict | None, force: bool) -> Run:
    _refuse_links(run_dir)
    manifest_path = run_dir / MANIFEST
    if run_dir.exists() and not manifest_path.is_file() and any(run_dir.iterdir()):
        raise TunelabError(f"{run_dir}: exists and is not a tunelab run; choose another --name or output.dir")
    if manifest_path.is_file():
        old = read_manifest(run_dir)
        status = old.get("status")
        if overwrite:
            if old.get("name") != exp.run_name or run_dir.resolve().parent != Path(exp.output.dir).resolve():
                raise TunelabError(
                    f"{run_dir}: holds a run named {old.get('name')!r}; --overwrite replaces only its own run"
                )
            shutil.rmtree(run_dir)
        elif resume:
            if status == "completed":
                raise TunelabError(f"{run_dir}: already completed; nothing to resume (use --overwrite to retrain)")
            changed = changed_inputs(old, exp, provenance or {})
            if changed and not force:
                raise TunelabError(
                    f"{run_dir}: since this run started, {'; '.join(changed)}; resuming would mix two experiments: "
                    "use --name for a new run, or --force to continue anyway"
                )
            old.update(
                status="running", resumed_at=now(), error=None, **({"forced_resume": changed} if changed else {})
            )
            run = Run(run_dir, old, resuming=last_checkpoint(run_dir) is not None)
            if not run.resuming:  # it died before its first checkpoint: start over, without its metrics
                (run_dir / METRICS).unlink(missing_ok=True)
            write_json(manifest_path, old)
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
    tmp = run_dir / f".{EXPERIMENT}.tmp"
    tmp.write_text(yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, run_dir / EXPERIMENT)
    manifest = {
        "name": exp.run_name,
        "experiment": exp.name,
        "status": "running",
        "config_hash": exp.config_hash(),
        "method": exp.method,
        "scope": exp.scope.kind,
        "quantization": quantization_record(exp),
        "created_at": now(),
        "started_at": now(),
        "ended_at": None,
        "error": None,
        "versions": versions(),
        "seed": exp.train.seed,
    }
    run = Run(run_dir, manifest, resuming=False, created=True)
    write_json(manifest_path, manifest)
    return run


def load_run_experiment(run_dir: Path) -> Experiment:
    return Experiment.model_validate(yaml.safe_load((Path(run_dir) / EXPERIMENT).read_text()))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def list_runs(root: Path) -> list[dict]:
    """Summaries of every run under `root` (studies nest one level deeper), newest first."""
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
                "name": m.get("name"),
                "dir": str(run_dir),
                "status": m.get("status"),
                "method": m.get("method"),
                "scope": m.get("scope"),
                "quantization": (m.get("quantization") or {}).get("describe"),
                "target_modules": m.get("target_modules"),
                "layers": m.get("layers"),
                "trainable_percent": m.get("trainable_percent"),
                "final_train_loss": m.get("final_train_loss"),
                "eval_loss": m.get("final_eval_loss"),
                "train_seconds": m.get("train_seconds"),
                "created_at": m.get("created_at"),
            }
        )
    return sorted(rows, key=lambda r: r["created_at"] or "", reverse=True)
