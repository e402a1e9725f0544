"""Where each tracker writes, and what stays the user's."""

from pathlib import Path

from tunelab.trackers import environment_for, flatten

RUN = Path("/data/runs/qv-1234")


def test_defaults_point_every_tracker_beside_the_run() -> None:
    env = environment_for(["tensorboard", "mlflow", "wandb", "trackio"], RUN, "ladder", {})
    assert env == {
        "TENSORBOARD_LOGGING_DIR": "/data/runs/qv-1234/tensorboard",
        "MLFLOW_TRACKING_URI": "sqlite:////data/runs/mlflow.db",
        "MLFLOW_EXPERIMENT_NAME": "ladder",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "WANDB_DIR": "/data/runs/qv-1234",
        "WANDB_PROJECT": "tunelab",
        "WANDB_RUN_GROUP": "ladder",
        "WANDB_SILENT": "true",
    }
    assert environment_for([], RUN, "ladder", {}) == {}


def test_what_the_user_set_stays_theirs_except_tensorboards_run_folder() -> None:
    user = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_PROJECT": "mine", "TENSORBOARD_LOGGING_DIR": "/tb"}
    env = environment_for(["tensorboard", "mlflow", "wandb"], RUN, "ladder", user)
    assert "MLFLOW_TRACKING_URI" not in env and "WANDB_PROJECT" not in env
    assert env["MLFLOW_EXPERIMENT_NAME"] == "ladder" and env["WANDB_RUN_GROUP"] == "ladder"
    # one shared folder would mix every run's curves into one
    assert env["TENSORBOARD_LOGGING_DIR"] == "/data/runs/qv-1234/tensorboard"


def test_flatten_keeps_lists_and_prefixes_every_key() -> None:
    nested = {"train": {"learning_rate": 1e-4, "report_to": ["mlflow"]}, "scope": {"lora": {"r": 8}}, "name": "x"}
    assert flatten(nested, "experiment") == {
        "experiment.train.learning_rate": 1e-4,
        "experiment.train.report_to": ["mlflow"],
        "experiment.scope.lora.r": 8,
        "experiment.name": "x",
    }
