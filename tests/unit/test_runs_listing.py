"""`tunelab runs` filters and `tunelab show`, on run folders written as tunelab writes them."""

import json
from pathlib import Path

from tests.conftest import run_cli
from tunelab.runs import BaseModelRecord, Manifest, list_runs, write_manifest


def make_run(root: Path, name: str, status: str, base: str, created: str, losses: list[float] = ()) -> Path:
    run = root / name
    run.mkdir(parents=True)
    manifest = Manifest(
        name=name,
        status=status,
        method="sft",
        scope="lora",
        created_at=created,
        base_model=BaseModelRecord(id=base, fingerprint="f"),
        trainable_params=10,
        total_params=1000,
        trainable_percent=1.0,
        layers=[0, 1, 2],
        target_modules=["q_proj", "v_proj"],
        global_steps=len(losses),
        base_eval_loss=3.0 if losses else None,
        final_eval_loss=1.5 if losses else None,
        error="NonFiniteLoss: the loss became nan" if status == "failed" else None,
    )
    write_manifest(run, manifest)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": x}) + "\n" for i, x in enumerate(losses))
    )
    return run


def runs_folder(tmp_path: Path) -> Path:
    make_run(tmp_path, "lora-qv", "completed", "meta-llama/Llama-3.1-8B-Instruct", "2026-12-01T10:00", [3.0, 2.0, 1.0])
    make_run(tmp_path, "lora-all", "failed", "meta-llama/Llama-3.1-8B-Instruct", "2026-12-01T11:00", [3.0])
    make_run(tmp_path, "partial", "completed", "builtin:tiny-chat", "2026-12-01T12:00", [2.0, 1.0])
    return tmp_path


def test_runs_filters_by_name_status_and_base(tmp_path: Path) -> None:
    root = runs_folder(tmp_path)
    names = lambda **kw: [r["name"] for r in list_runs(root, **kw)]  # noqa: E731
    assert names() == ["partial", "lora-all", "lora-qv"]  # newest first: 12:00, 11:00, 10:00 (not by name)
    assert names(name="lora-*") == ["lora-all", "lora-qv"]
    assert names(status="completed") == ["partial", "lora-qv"]
    assert names(base="Llama-3.1", status="completed") == ["lora-qv"]
    out = run_cli("runs", str(root), "--json", "--name", "part*")
    assert out.returncode == 0, out.stderr
    assert [r["name"] for r in json.loads(out.stdout)] == ["partial"]


def test_show_prints_a_runs_summary_and_curve(tmp_path: Path) -> None:
    root = runs_folder(tmp_path)
    scores = {"arc_easy/acc": 0.625, "arc_easy/acc_norm": 0.5}
    stored = {"arc_easy": {"scores": scores, "base": {"arc_easy/acc": 0.25}}}
    (root / "lora-qv" / "lm_eval.json").write_text(json.dumps(stored))
    out = run_cli("show", str(root / "lora-qv"))
    assert out.returncode == 0, out.stderr
    assert "lm-eval arc_easy/acc 0.6250 (base 0.2500)\nlm-eval arc_easy/acc_norm 0.5000\n" in out.stdout
    assert "lora-qv  completed  sft · lora · meta-llama/Llama-3.1-8B-Instruct" in out.stdout
    assert "eval loss 3.0000 -> 1.5000" in out.stdout
    assert "train loss █▅▁ 3.0000 -> 1.0000 (3 logged)" in out.stdout
    failed = run_cli("show", str(root / "lora-all"))
    assert "error: NonFiniteLoss: the loss became nan" in failed.stdout
    as_json = json.loads(run_cli("show", str(root / "partial"), "--json").stdout)
    assert as_json["name"] == "partial" and as_json["base_model"]["id"] == "builtin:tiny-chat"
    missing = run_cli("show", str(root / "nope"))
    assert missing.returncode != 0 and "not a tunelab run" in missing.stderr and "Traceback" not in missing.stderr


def test_runs_json_rows_are_the_manifests_summary(tmp_path: Path) -> None:
    run = make_run(tmp_path, "lora-qv", "completed", "org/Model-7B", "2026-12-01T10:00", [3.0, 2.0])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    rows = {r["name"]: r for r in list_runs(tmp_path)}
    assert rows["broken"] == {
        "name": "broken",
        "dir": str(tmp_path / "broken"),
        "status": "unreadable",
        "created_at": None,
    }
    assert rows["lora-qv"] == {
        "name": "lora-qv",
        "dir": str(run),
        "status": "completed",
        "method": "sft",
        "scope": "lora",
        "base": "org/Model-7B",
        "quantization": None,
        "target_modules": ["q_proj", "v_proj"],
        "layers": [0, 1, 2],
        "trainable_percent": 1.0,
        "final_train_loss": None,
        "eval_loss": 1.5,
        "eval_reward": None,  # GRPO runs' held-out measure
        "eval_also_losses": {},
        "train_seconds": None,
        "created_at": "2026-12-01T10:00",
        "logged_step": None,  # how far a run that has not completed got
        "max_steps": None,
        "disk_bytes": sum(p.stat().st_size for p in run.rglob("*") if p.is_file()),
    }
    # a base filter never matches a run whose base is unknown (the unreadable one)
    assert [r["name"] for r in list_runs(tmp_path, base="X")] == []
    assert [r["name"] for r in list_runs(tmp_path, base="Model")] == ["lora-qv"]


def test_a_manifest_of_the_wrong_shape_names_the_file(tmp_path: Path) -> None:
    import pytest

    from tunelab.errors import TunelabError
    from tunelab.runs import read_manifest

    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(TunelabError, match=r"unreadable \(the file: "):
        read_manifest(tmp_path)


def test_trim_metrics_keeps_the_steps_up_to_the_checkpoint_on_the_writing_rank_only(tmp_path: Path) -> None:
    from tunelab.runs import Run, read_metrics

    run_dir = make_run(tmp_path, "r", "running", "b", "2026-12-01T10:00", [6.0, 5.0, 4.0, 3.0, 2.0])
    Run(run_dir, Manifest(name="r", status="running"), resuming=True, writable=False).trim_after(2)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    Run(run_dir, Manifest(name="r", status="running"), resuming=True).trim_after(2)
    assert read_metrics(run_dir) == [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.0}]


def test_lm_eval_scores_merge_every_task_with_the_base_beside_them(tmp_path: Path) -> None:
    from tunelab.runs import lm_eval_scores

    stored = {
        "a": {"scores": {"a/acc": 0.5}, "base": {"a/acc": 0.25}},
        "b": {"scores": {"b/em": 1.0, "b/f1": 0.75}, "base": None},
    }
    (tmp_path / "lm_eval.json").write_text(json.dumps(stored))
    assert lm_eval_scores(tmp_path) == ({"a/acc": 0.5, "b/em": 1.0, "b/f1": 0.75}, {"a/acc": 0.25})


def test_resume_names_exactly_the_data_files_that_changed() -> None:
    from tests.conftest import EXAMPLES
    from tunelab.config import load_experiment
    from tunelab.runs import DataRecord, Provenance, changed_inputs

    exp = load_experiment(EXAMPLES / "quickstart.yaml")

    def provenance(hashes: dict[str, str], template: str = "t", weights: str = "w") -> Provenance:
        data = DataRecord(format="messages", train_examples=1, eval_examples=0, hashes=hashes)
        return Provenance(
            base_model=BaseModelRecord(id="b", fingerprint=weights), data=data, chat_template_hash=template
        )

    old = Manifest(
        name="r", status="failed", config_hash=exp.config_hash(), **provenance({"a": "1", "b": "2"}).model_dump()
    )
    assert changed_inputs(old, exp, provenance({"a": "1", "b": "2"})) == []
    assert changed_inputs(old, exp, provenance({"a": "1", "b": "3"})) == ["the data changed (b)"]
    # A folder or hub dataset that runs before its records were hashed recorded as "hub-or-folder" is not known to have
    # changed when it now has a digest; a file that was hashed still is.
    older = old.model_copy(update={"data": provenance({"a": "1", "b": "hub-or-folder"}).data})
    assert changed_inputs(older, exp, provenance({"a": "1", "b": "9"})) == []
    assert changed_inputs(older, exp, provenance({"a": "7", "b": "9"})) == ["the data changed (a)"]
    assert changed_inputs(old, exp, provenance({"a": "1", "b": "2"}, template="u", weights="v")) == [
        "the chat template changed",
        "the base model's weights changed (fingerprint w -> v)",
    ]


def test_a_run_without_a_creation_time_is_listed_last(tmp_path: Path) -> None:
    runs_folder(tmp_path)
    (tmp_path / "undated").mkdir()
    write_manifest(tmp_path / "undated", Manifest(name="undated", status="completed"))
    assert [r["name"] for r in list_runs(tmp_path)] == ["partial", "lora-all", "lora-qv", "undated"]


def test_runs_table_rounds_what_the_json_keeps_whole(tmp_path: Path) -> None:
    """`tunelab runs` prints losses to 4 decimals, the trainable share to 4 digits, the time as a person reads it and
    the creation time to the minute in this machine's zone; `--json` keeps the manifests' numbers as they are."""
    import datetime as dt
    from io import StringIO

    from rich.console import Console

    from tunelab.console import human_seconds
    from tunelab.report.terminal import print_runs, print_show
    from tunelab.runs import read_manifest, read_metrics

    run = make_run(tmp_path, "long", "completed", "builtin:tiny-chat", "2026-12-04T16:38:50.686+00:00", [2.0, 1.0])
    m = read_manifest(run)
    m.final_train_loss, m.final_eval_loss, m.trainable_percent, m.train_seconds = (
        0.4789912700653076, 0.46988803148269653, 14.622305, 4523.4
    )  # fmt: skip
    write_manifest(run, m)
    rows = list_runs(tmp_path)
    assert (rows[0]["final_train_loss"], rows[0]["eval_loss"]) == (0.4789912700653076, 0.46988803148269653)
    shown = StringIO()
    print_runs(rows, console=Console(file=shown, width=300))
    line = next(x for x in shown.getvalue().splitlines() if x.lstrip().startswith("long"))
    local = dt.datetime(2026, 12, 4, 16, 38, tzinfo=dt.timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M")
    cells = [c.strip() for c in line.split("│")]
    assert cells[4:] == ["14.62", "0.4790", "0.4699", "1 h 15 min", cells[8], local]
    assert "0.47899" not in shown.getvalue()
    shown = StringIO()
    print_show(run, read_manifest(run), read_metrics(run), console=Console(file=shown, width=300))
    assert f"folder {run}; created {local}; ended -\n" in shown.getvalue()
    assert [human_seconds(s) for s in (6.46, 59.96, 723.0, 3600.0)] == [
        "6.5 s",
        "1 min 00 s",
        "12 min 03 s",
        "1 h 00 min",
    ]


def test_a_run_recorded_as_running_that_no_process_trains_is_shown_as_died(tmp_path: Path) -> None:
    """A process killed outright (SIGKILL, the out-of-memory killer, a machine that stopped) leaves its run recorded
    as running. While a process holds the run's lock `runs` and `show` say running; once none does, died, with where
    a resume goes on from. A run without a lock file (made before there was one) stays as recorded."""
    import os
    from io import StringIO

    from rich.console import Console

    from tunelab.report.terminal import print_runs, print_show
    from tunelab.runs import lock_run, read_manifest, read_metrics, shown_status

    run = make_run(tmp_path, "long", "running", "builtin:tiny-chat", "2026-12-04T16:38", [3.0, 2.0, 1.0])
    write_manifest(run, read_manifest(run).updated(max_steps=10))  # as training begins
    assert [r["status"] for r in list_runs(tmp_path)] == ["running"]
    held = lock_run(tmp_path, "long")
    assert [r["status"] for r in list_runs(tmp_path)] == ["running"]
    os.close(held)  # as the OS lets go of a dead process's locks
    assert [r["status"] for r in list_runs(tmp_path, status="died")] == ["died"]
    manifest = read_manifest(run)
    assert manifest.status == "running" and shown_status(run, manifest) == "died"  # shown, not written
    shown = StringIO()
    print_show(
        run, manifest, read_metrics(run), status=shown_status(run, manifest), console=Console(file=shown, width=300)
    )
    lines = shown.getvalue().splitlines()
    assert lines[0].startswith("long  died  sft · lora")
    assert lines[2:5] == [
        "step 3 of 10 logged (30%)",
        "no process trains it: it stopped without recording why (killed, out of memory, or its machine stopped)",
        "resume: the same tunelab train command with --resume continues from its start (no checkpoint yet)",
    ]
    shown = StringIO()
    print_runs(list_runs(tmp_path), console=Console(file=shown, width=300))
    assert "│ died 3/10 │" in shown.getvalue()
