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
    return json.loads(path.read_text())


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
    }


@dataclass
class Run:
    dir: Path
    manifest: dict
    resuming: bool
    writable: bool = True  # False on every process but the first of a multi-process run

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


def last_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if folder.is_dir() else []
    return found[-1] if found else None


def open_run(exp: Experiment, resume: bool, overwrite: bool, main_process: bool = True) -> Run:
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
    manifest_path = run_dir / MANIFEST
    if run_dir.exists() and not manifest_path.is_file() and any(run_dir.iterdir()):
        raise TunelabError(f"{run_dir}: exists and is not a tunelab run; choose another --name or output.dir")
    if manifest_path.is_file():
        old = read_manifest(run_dir)
        status = old.get("status")
        if overwrite:
            shutil.rmtree(run_dir)
        elif resume:
            if status == "completed":
                raise TunelabError(f"{run_dir}: already completed; nothing to resume (use --overwrite to retrain)")
            if old.get("config_hash") != exp.config_hash():
                raise TunelabError(
                    f"{run_dir}: the experiment changed since this run started (config hash "
                    f"{old.get('config_hash')} -> {exp.config_hash()}); use --name for a new run"
                )
            old.update(status="running", resumed_at=now(), error=None)
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
        "created_at": now(),
        "started_at": now(),
        "ended_at": None,
        "error": None,
        "versions": versions(),
        "seed": exp.train.seed,
    }
    run = Run(run_dir, manifest, resuming=False)
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
        m = json.loads(manifest_path.read_text())
        rows.append(
            {
                "name": m.get("name"),
                "dir": str(run_dir),
                "status": m.get("status"),
                "method": m.get("method"),
                "scope": m.get("scope"),
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
