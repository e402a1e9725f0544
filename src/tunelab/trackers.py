"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, Weights & Biases and Trackio.

Transformers' own integrations log the Trainer's metrics (loss, learning rate, eval loss at every evaluation, the
base eval loss at step 0). tunelab adds, through each tracker's public API, what only it knows: the resolved
experiment (flattened), its config hash, the trainable counts, plan's memory estimate, and a summary of base,
final eval and final train loss. It points each tracker at local storage beside the runs unless the user
configured one, and groups runs: a study's variants share the study's name, other runs their experiment's name.

    tracker      local storage (default)                       group
    tensorboard  <run>/tensorboard/ (`tensorboard --logdir <output.dir>` shows every run)   the output folder
    mlflow       sqlite:///<output.dir>/mlflow.db (MLFLOW_TRACKING_URI wins)               MLflow experiment
    wandb        <run>/wandb/ (WANDB_DIR wins; WANDB_MODE=offline for no network)           W&B group
    trackio      Trackio's local store (TRACKIO_DIR, else ~/.cache/huggingface/trackio)     Trackio project

Other trackers Transformers knows (comet_ml, neptune, ...) are passed through as they are.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunelab.errors import ConfigError

# tracker -> (the modules it needs, how to install them); MLflow's local sqlite store needs SQLAlchemy
PACKAGES = {
    "tensorboard": (("tensorboard",), "pip install 'tunelab[tensorboard]'"),
    "mlflow": (("mlflow", "sqlalchemy"), "pip install 'tunelab[mlflow]'"),
    "wandb": (("wandb",), "pip install 'tunelab[wandb]'"),
    "trackio": (("trackio",), "pip install 'tunelab[trackio]'"),
    "azure_ml": (("azureml",), "pip install azureml-core"),
    "flyte": (("flytekit",), "pip install flytekit"),
    "kubeflow": (("kubeflow",), "pip install kubeflow"),
}


def check_trackers(report_to: list[str]) -> None:
    """Refuse, before any run starts, a tracker whose package is not installed (Transformers fails mid-setup)."""
    for tracker in report_to:
        modules, install = PACKAGES.get(tracker, ((tracker,), f"pip install {tracker}"))
        missing = next((m for m in modules if importlib.util.find_spec(m) is None), None)
        if missing is not None:
            raise ConfigError(f"train.report_to: {tracker} needs the {missing} package; {install}")


def environment_for(report_to: list[str], run_dir: Path, group: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment variables Transformers' integrations and the trackers read, for one run; a variable the
    user set (in `environ`) stays theirs, except TensorBoard's folder, which is always the run's own."""
    wanted: dict[str, str] = {}
    if "tensorboard" in report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "mlflow" in report_to:
        store = f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"
        wanted |= _unset(
            {"MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_NAME": group, "MLFLOW_LOGGING_LEVEL": "WARNING"}, environ
        )
    if "wandb" in report_to:
        wandb = {"WANDB_DIR": str(run_dir), "WANDB_PROJECT": "tunelab", "WANDB_RUN_GROUP": group}
        wanted |= _unset({**wandb, "WANDB_SILENT": "true"}, environ)
    return wanted


def where(report_to: list[str], run_dir: Path, group: str) -> list[str]:
    """One line a tracker: where this run went and how to look at it."""
    lines = {
        "tensorboard": f"tensorboard: tensorboard --logdir {run_dir.parent}",
        "mlflow": f"mlflow: experiment '{os.environ.get('MLFLOW_EXPERIMENT_NAME', group)}' in "
        f"{os.environ.get('MLFLOW_TRACKING_URI', '')}",
        "wandb": f"wandb: {os.environ.get('WANDB_MODE', 'online')} run in {os.environ.get('WANDB_DIR', run_dir)} "
        f"(group '{os.environ.get('WANDB_RUN_GROUP', group)}')",
        "trackio": f"trackio: trackio show --project {group}",
    }
    return [lines[name] for name in report_to if name in lines]


def _unset(defaults: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in defaults.items() if k not in environ}


@contextmanager
def environment(report_to: list[str], run_dir: Path, group: str) -> Iterator[None]:
    """Set one run's tracker environment while its trainer is built and trains, then restore the process's own
    (a study trains its variants one after another in one process)."""
    original = dict(os.environ)
    os.environ.update(environment_for(report_to, run_dir, group, original))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(original)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists stay values. Prefixed, so no key can meet one the
    integrations log themselves (MLflow refuses a parameter logged twice with different values)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return out


class TensorBoard:
    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def params(self, params: dict[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("tunelab/experiment", "| setting | value |\n|---|---|\n" + table)
        for key, value in params.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key.startswith("tunelab."):
                self.writer.add_scalar(key.replace(".", "/", 1), value, 0)

    def summary(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"tunelab/{key}", value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class MLflow:
    # MLflow keeps a parameter value up to 6000 characters
    LIMIT = 6000

    def params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v)[: self.LIMIT] for k, v in params.items()})
        mlflow.set_tag("tunelab.config_hash", params["tunelab.config_hash"])

    def summary(self, values: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({f"tunelab.{k}": v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        pass  # Transformers' MLflowCallback ends the run it started


class Wandb:
    def params(self, params: dict[str, Any]) -> None:
        import wandb

        wandb.run.config.update(params, allow_val_change=True)

    def summary(self, values: dict[str, float], step: int) -> None:
        import wandb

        wandb.run.summary.update({f"tunelab/{k}": v for k, v in values.items()})

    def finish(self) -> None:
        import wandb

        # Transformers leaves the W&B run open, and wandb keeps the settings it read first (WANDB_DIR, the group):
        # the next run of a study would log into this one, or into this run's folder
        wandb.finish()
        wandb.teardown()


class Trackio:
    def params(self, params: dict[str, Any]) -> None:
        import trackio

        trackio.config.update(params)  # sent with the run's first logged record

    def summary(self, values: dict[str, float], step: int) -> None:
        import trackio

        trackio.log({f"tunelab/{k}": v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        pass  # Transformers' TrackioCallback finishes the run


def _sinks(report_to: list[str], run_dir: Path) -> list[TensorBoard | MLflow | Wandb | Trackio]:
    made = {"tensorboard": lambda: TensorBoard(run_dir), "mlflow": MLflow, "wandb": Wandb, "trackio": Trackio}
    return [made[name]() for name in report_to if name in made]


class TrackerRecord(TrainerCallback):
    """tunelab's additions to each tracker's run. Runs after Transformers' integration callbacks (the Trainer puts
    callbacks passed to it last), so their runs exist when the parameters are logged; the summary goes out with
    the Trainer's last log (the one with total_flos), before those callbacks close their runs."""

    def __init__(self, report_to: list[str], run_dir: Path, params: dict[str, Any], held_out: str = "loss") -> None:
        """`held_out`: the method's held-out measure, which the summary gives before and after (eval_loss; GRPO's
        eval_reward, its eval_loss being the policy loss, no measure of the replies)."""
        self.report_to, self.run_dir, self.params, self.held_out = report_to, run_dir, params, held_out
        self.sinks: list[TensorBoard | MLflow | Wandb | Trackio] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sinks = _sinks(self.report_to, self.run_dir)
            for sink in self.sinks:
                sink.params(self.params)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.sinks or "total_flos" not in (logs or {}):  # the Trainer's last log, after the last eval
            return
        key = f"eval_{self.held_out}"
        evals = [r[key] for r in state.log_history if key in r]
        base = [r[key] for r in state.log_history if key in r and r.get("step") == 0]
        losses = [r["loss"] for r in state.log_history if "loss" in r]
        values = {f"base_{key}": base[0] if base else None, f"final_{key}": evals[-1] if evals else None}
        values["final_train_loss"] = losses[-1] if losses else None
        for sink in self.sinks:
            sink.summary({k: v for k, v in values.items() if v is not None}, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        for sink in self.sinks:
            sink.finish()
        if self.sinks:
            print("\n".join(where(self.report_to, self.run_dir, args.project)), flush=True)
        self.sinks = []


def run_params(exp_dump: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """What tunelab logs to each tracker: the resolved experiment, flattened, and tunelab's own facts."""
    return {**flatten(exp_dump, "experiment"), **{f"tunelab.{k}": v for k, v in facts.items()}}
