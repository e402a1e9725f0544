"""Trackers (train.report_to): each of TensorBoard, MLflow, W&B (offline) and Trackio holds, read back through its
own reader, what tunelab recorded: the per-step losses of metrics.jsonl, the experiment's settings and hash, the
trainable count, plan's memory estimate and the base/final eval loss of the manifest. A study's variants are grouped."""

import os
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, run_cli
from tests.wandb_offline import offline_run
from tunelab.runs import read_manifest, read_metrics
from tunelab.study import load_study, run_study

pytestmark = pytest.mark.slow
ALL = "train.report_to=[tensorboard,mlflow,wandb,trackio]"


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_text(folder: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def mlflow_runs(store: Path, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: (r, client.get_metric_history(r.info.run_id, "loss")) for r in found}


def test_every_tracker_holds_what_tunelab_recorded(tmp_path: Path, tiny_model_dir) -> None:
    out = tmp_path / "runs"
    steps = ["--set", "train.max_steps=4", "--set", "train.logging_steps=1", "--set", "train.eval_steps=2"]
    done = run_cli("train", str(EXAMPLES / "quickstart.yaml"), "--set", f"output.dir={out}", *steps, "--set", ALL)
    assert done.returncode == 0, done.stderr[-3000:]
    run = out / "quickstart"
    manifest, metrics = read_manifest(run), read_metrics(run)
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == 4 and manifest.base_eval_loss is not None and manifest.final_eval_loss is not None
    assert f"tensorboard --logdir {out}" in done.stdout and "wandb: offline run" in done.stdout

    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert scalars["tunelab/final_eval_loss"] == pytest.approx([manifest.final_eval_loss], rel=1e-6)
    assert scalars["tunelab/base_eval_loss"] == pytest.approx([manifest.base_eval_loss], rel=1e-6)
    assert scalars["tunelab/trainable_params"] == [manifest.trainable_params]
    assert f"| tunelab.config_hash | {manifest.config_hash} |" in tensorboard_text(
        run / "tensorboard", "tunelab/experiment"
    )

    (mlrun, history), *others = mlflow_runs(out / "mlflow.db", "quickstart").values()
    assert not others and mlrun.info.run_name == "quickstart"
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses, rel=1e-12)
    params, values = mlrun.data.params, mlrun.data.metrics
    assert params["tunelab.config_hash"] == manifest.config_hash and mlrun.data.tags["tunelab.config_hash"]
    assert params["experiment.train.learning_rate"] == "0.003" and params["experiment.scope.lora.r"] == "16"
    assert int(params["tunelab.estimated_memory_bytes"]) == manifest.estimated_memory_bytes
    assert values["tunelab.final_eval_loss"] == pytest.approx(manifest.final_eval_loss, rel=1e-12)
    assert values["tunelab.base_eval_loss"] == pytest.approx(manifest.base_eval_loss, rel=1e-12)

    wandb = offline_run(run)
    assert wandb["group"] == "quickstart" and wandb["name"] == "quickstart"
    assert [h["train/loss"] for h in wandb["history"] if "train/loss" in h] == pytest.approx(losses, rel=1e-12)
    assert wandb["config"]["tunelab.trainable_params"] == manifest.trainable_params
    assert wandb["config"]["experiment.model.id"] == "builtin:tiny-chat"
    assert wandb["summary"]["tunelab/final_eval_loss"] == pytest.approx(manifest.final_eval_loss, rel=1e-12)

    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    (trun,) = trackio.Api().runs("quickstart")
    assert trun.name == "quickstart" and trun.config["tunelab.config_hash"] == manifest.config_hash
    logs = SQLiteStorage.get_logs("quickstart", "quickstart")
    assert [r["train/loss"] for r in logs if "train/loss" in r] == pytest.approx(losses, rel=1e-12)
    assert [r["tunelab/final_eval_loss"] for r in logs if "tunelab/final_eval_loss" in r] == pytest.approx(
        [manifest.final_eval_loss], rel=1e-12
    )


STUDY = """\
name: ladder-mini
base: {base}
output: {out}
variants:
  qv:
    set: {{scope.lora.targets: qv}}
  qkvo:
    set: {{scope.lora.targets: qkvo}}
"""


def test_a_study_groups_its_variants_in_each_tracker(tmp_path: Path, tiny_model_dir) -> None:
    path = tmp_path / "ladder.yaml"
    path.write_text(STUDY.format(base=EXAMPLES / "quickstart.yaml", out=tmp_path / "study"))
    trackers = ("TENSORBOARD_", "MLFLOW_", "WANDB_", "TRACKIO_")
    environment = {k: v for k, v in os.environ.items() if k.startswith(trackers)}
    settings = ["train.max_steps=2", "train.report_to=[tensorboard,mlflow,wandb,trackio]"]
    outcomes, _ = run_study(load_study(path, settings), log=lambda *_: None)
    assert [o.status for o in outcomes] == ["trained", "trained"], [o.error for o in outcomes]
    assert {k: v for k, v in os.environ.items() if k.startswith(trackers)} == environment  # set for each run only
    runs = sorted(Path(o.run_dir).name for o in outcomes)

    assert sorted(mlflow_runs(tmp_path / "study" / "mlflow.db", "ladder-mini")) == runs
    assert {Path(o.run_dir).name: offline_run(Path(o.run_dir))["group"] for o in outcomes} == dict.fromkeys(
        runs, "ladder-mini"
    )
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "study"))
    assert sorted(multiplexer.Runs()) == [f"{r}/tensorboard" for r in runs]

    import trackio

    assert sorted(r.name for r in trackio.Api().runs("ladder-mini")) == runs


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path: Path) -> None:
    out = run_cli(
        "train",
        str(EXAMPLES / "quickstart.yaml"),
        "--set",
        f"output.dir={tmp_path}",
        "--set",
        "train.report_to=[comet_ml]",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("train.report_to: comet_ml needs the comet_ml package; pip install comet_ml")
    assert not any(tmp_path.iterdir())
