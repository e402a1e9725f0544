"""What `open_run` and the run folder's writers leave on disk, on each path: fresh, refused, resumed, other ranks."""

import json
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES
from tunelab.config import Experiment, load_experiment
from tunelab.errors import TunelabError
from tunelab.runs import (
    Manifest,
    changed_inputs,
    lm_eval_scores,
    open_run,
    read_manifest,
    read_metrics,
    setting_changes,
    versions,
    write_atomic,
    write_json,
    write_lm_eval,
)


def quickstart(out: Path) -> Experiment:
    return load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={out}"])


def checkpoint(run_dir: Path, step: int) -> None:
    """A checkpoint folder as the Trainer leaves a finished one: its state last, after optimizer and scheduler."""
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("optimizer.pt", "scheduler.pt"):
        (folder / name).write_bytes(b"")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def test_a_fresh_run_is_created_and_marked_as_made_by_this_call(tmp_path: Path) -> None:
    run = open_run(quickstart(tmp_path), resume=False, overwrite=False)
    assert run.created and not run.resuming and run.writable
    assert read_manifest(tmp_path / "quickstart").status == "running"
    run.close()


def test_a_resume_reopens_without_claiming_the_folder(tmp_path: Path) -> None:
    open_run(quickstart(tmp_path), resume=False, overwrite=False).close()
    checkpoint(tmp_path / "quickstart", 3)
    run = open_run(quickstart(tmp_path), resume=True, overwrite=False)
    # `created` decides whether a failure may delete the folder: a resumed run's folder is never deleted
    assert run.resuming and not run.created
    run.close()


def test_other_ranks_get_a_read_only_view_that_knows_whether_this_is_a_resume(tmp_path: Path) -> None:
    exp = quickstart(tmp_path)
    assert not open_run(exp, resume=True, overwrite=False, main_process=False).resuming  # nothing there yet
    checkpoint(tmp_path / "quickstart", 3)
    view = open_run(exp, resume=True, overwrite=False, main_process=False)
    assert view.resuming and not view.writable and not view.created
    assert view.dir == tmp_path / "quickstart" and view.manifest.config_hash == exp.config_hash()
    assert not (tmp_path / "quickstart" / "manifest.json").exists()  # only the main process writes
    assert not open_run(exp, resume=False, overwrite=False, main_process=False).resuming


def test_an_unfinished_run_in_the_way_names_the_three_ways_out(tmp_path: Path) -> None:
    open_run(quickstart(tmp_path), resume=False, overwrite=False).close()
    with pytest.raises(TunelabError) as error:
        open_run(quickstart(tmp_path), resume=False, overwrite=False)
    assert str(error.value) == (
        f"{tmp_path}/quickstart: a running run is already there; use --resume to continue it, "
        "--overwrite to replace it, or --name to start another"
    )


def test_resume_after_an_edit_names_both_config_hashes(tmp_path: Path) -> None:
    before, after = (
        quickstart(tmp_path),
        load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={tmp_path}", "train.learning_rate=0.5"]),
    )
    old = Manifest(name="quickstart", status="failed", config_hash=before.config_hash())
    assert before.config_hash() != after.config_hash()
    assert changed_inputs(old, after, None) == [
        f"the experiment changed (config hash {before.config_hash()} -> {after.config_hash()})"
    ]


def test_a_resume_names_the_settings_that_changed_and_lets_how_it_runs_change(tmp_path: Path) -> None:
    before = quickstart(tmp_path)
    recorded = before.model_dump(mode="json")
    old = Manifest(name="quickstart", status="failed", config_hash=before.config_hash())
    changed = load_experiment(
        EXAMPLES / "quickstart.yaml", [f"output.dir={tmp_path}", "train.learning_rate=0.5", "scope.lora.r=4"]
    )
    assert changed_inputs(old, changed, None, recorded) == [
        "the experiment changed (scope.lora.r 16 -> 4, train.learning_rate 0.003 -> 0.5)"
    ]
    # Memory settings change how it computes, not what: not a change of the experiment.
    refitted = load_experiment(
        EXAMPLES / "quickstart.yaml",
        [f"output.dir={tmp_path}", "train.gradient_checkpointing=on", "train.micro_batch_size=1"],
    )
    assert refitted.config_hash() != before.config_hash()
    assert changed_inputs(old, refitted, None, recorded) == []
    assert setting_changes(recorded, refitted) == {
        "train.gradient_checkpointing": ("auto", "on"),
        "train.micro_batch_size": (None, 1),
    }
    # A record written before a setting existed holds it at its default.
    del recorded["train"]["compile"]
    assert setting_changes(recorded, before) == {}


def test_json_files_of_a_run_are_indented_for_people_to_read(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": 1, "b": [2]})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1,\n  "b": [\n    2\n  ]\n}'


def test_values_json_cannot_hold_are_written_as_text(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"dir": tmp_path})
    assert json.loads((tmp_path / "x.json").read_text()) == {"dir": str(tmp_path)}


def test_a_run_that_logged_nothing_has_no_metrics(tmp_path: Path) -> None:
    from tunelab.runs import read_metrics

    assert read_metrics(tmp_path) == []


def test_stored_lm_eval_scores_read_back_as_written(tmp_path: Path) -> None:
    write_lm_eval(tmp_path, {"t": {"scores": {"t/acc": 0.75}, "base": {"t/acc": 0.5}}})
    assert json.loads((tmp_path / "lm_eval.json").read_text())["t"]["scores"] == {"t/acc": 0.75}
    assert lm_eval_scores(tmp_path) == ({"t/acc": 0.75}, {"t/acc": 0.5})


def test_the_recorded_versions_are_the_installed_ones() -> None:
    recorded = versions()
    for package in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        assert recorded[package] == version(package), package


def test_run_status_is_the_manifests_or_none_where_no_run_is(tmp_path: Path) -> None:
    from tunelab.runs import run_status

    assert run_status(tmp_path / "quickstart") is None
    open_run(quickstart(tmp_path), resume=False, overwrite=False).close()
    assert run_status(tmp_path / "quickstart") == "running"


def test_a_run_opens_in_an_output_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    run = open_run(quickstart(tmp_path / "a" / "b"), resume=False, overwrite=False)
    assert (tmp_path / "a" / "b" / "quickstart" / "manifest.json").is_file()
    run.close()


def test_a_manifest_from_before_base_models_were_recorded_resumes_without_comparing_weights() -> None:
    from tunelab.runs import BaseModelRecord, DataRecord, Provenance

    exp = load_experiment(EXAMPLES / "quickstart.yaml")
    now = Provenance(
        base_model=BaseModelRecord(id="b", fingerprint="w"),
        data=DataRecord(format="messages", train_examples=1, eval_examples=0, hashes={}),
        chat_template_hash="t",
    )
    old = Manifest(name="r", status="failed", config_hash=exp.config_hash())
    assert old.base_model is None and changed_inputs(old, exp, now) == []


def test_metrics_cut_short_at_the_last_line_are_read_without_it(tmp_path: Path) -> None:
    # A disk that filled (or a process killed) while a line was appended leaves it half written.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_a_damaged_metrics_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(TunelabError, match=r"metrics.jsonl: line 2 is damaged .*; delete that line"):
        read_metrics(tmp_path)


def test_a_failed_atomic_write_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"old": true}')
    # The temporary file is opened, then the write fails (as on a full disk): a lone surrogate has no UTF-8 form.
    with pytest.raises(UnicodeEncodeError):
        write_atomic(tmp_path / "manifest.json", '{"new": "\ud800"}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"old": True}
