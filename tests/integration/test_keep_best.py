"""train.keep: best and train.early_stop, on a run that overfits: 16 training chats, a constant learning rate, the
eval loss falls, then rises. The result is the best checkpoint's weights, the run stops two evaluations after it, and a
crash after that last checkpoint resumes to the same result without another step."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA, EXAMPLES, crash_after_save, run_cli
from tunelab.config import load_experiment
from tunelab.runs import other_checkpoints, read_metrics
from tunelab.train import train

pytestmark = pytest.mark.slow


def overfitting(tmp_path: Path) -> list[str]:
    small = tmp_path / "small.jsonl"
    small.write_text("".join((DATA / "sft_train.jsonl").read_text().splitlines(keepends=True)[:16]))
    return [
        f"data.train={small}",
        f"data.eval={DATA / 'sft_eval.jsonl'}",
        "train.learning_rate=0.01",
        "train.scheduler=constant",
        "train.max_steps=60",
        "train.eval_steps=4",
        "train.logging_steps=4",
        "train.keep=best",
        "train.early_stop=2",
        f"output.dir={tmp_path / 'runs'}",
    ]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_keep_best_and_early_stop_take_the_lowest_eval_loss(tmp_path: Path, tiny_model_dir) -> None:
    run = train(load_experiment(EXAMPLES / "quickstart.yaml", overfitting(tmp_path)))
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(run.run_dir) if "eval_loss" in r and r["step"] > 0}
    best = min(evals, key=evals.get)
    m = run.manifest
    assert 4 < best < max(evals)  # the eval loss fell, then rose: the best is neither the first nor the last
    assert (m.best_step, m.best_eval_loss, m.final_eval_loss) == (best, evals[best], evals[best])
    assert m.stopped_early and m.global_steps == best + 2 * 4 < 60  # two evaluations without a lower loss
    kept = sorted((p.name for p in (run.run_dir / "checkpoints").glob("checkpoint-*")), key=lambda n: int(n[11:]))
    assert kept == [f"checkpoint-{best}", f"checkpoint-{m.global_steps}"]  # the best survives the rotation
    result, best_weights = adapter(run.run_dir / "adapter"), adapter(run.run_dir / "checkpoints" / kept[0])
    assert all(torch.equal(result[k], best_weights[k]) for k in result)
    assert not all(torch.equal(result[k], adapter(run.run_dir / "checkpoints" / kept[1])[k]) for k in result)
    shown = run_cli("show", str(run.run_dir)).stdout
    assert f"result: the best checkpoint, step {best}, stopped early at step {m.global_steps}" in shown
    # the checkpoint that is not the result is the last step's: the one compare --checkpoints and show set beside it
    last = run.run_dir / "checkpoints" / kept[1]
    assert other_checkpoints(run.run_dir) == [last]
    assert f"; tunelab compare {run.run_dir} {last} sets step {m.global_steps} beside the result\n" in shown


def test_a_crash_after_the_early_stop_resumes_to_the_best_without_a_step(tmp_path: Path, tiny_model_dir) -> None:
    args = [str(EXAMPLES / "quickstart.yaml"), *(x for o in overfitting(tmp_path) for x in ("--set", o))]
    straight = train(load_experiment(EXAMPLES / "quickstart.yaml", overfitting(tmp_path), run_name="straight"))
    last = straight.manifest.global_steps
    killed = crash_after_save(last, *args, "--name", "crashed")
    assert killed.returncode == -9
    resumed = run_cli("train", *args, "--name", "crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from checkpoint-{last}" in resumed.stdout
    a, b = (adapter(tmp_path / "runs" / n / "adapter") for n in ("straight", "crashed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "runs" / "crashed" / "manifest.json").read_text())
    assert manifest["global_steps"] == last
    assert manifest["best_step"] == straight.manifest.best_step
