"""What goes wrong mid-run on real machines, and how a run comes back from it.

The disk: plan's estimate against what the Trainer and the run write, a run that cannot fit refused before anything
loads, and a disk that fills mid-run: one line, the checkpoint it cut short removed, the failure recorded, and
--resume ending where an uninterrupted run ends. Device memory: running out is one line with the settings that make
it fit, and a resume with those settings (they change how the run computes, not what) goes on without --force."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    EXAMPLES,
    REPO,
    SCRATCH,
    can_mount_small_disks,
    relative_distance,
    run_cli,
    run_python,
    trained_tensors,
)
from tunelab.config import load_experiment
from tunelab.plan import SMALL_FILES, make_plan
from tunelab.runs import read_manifest
from tunelab.train import train

pytestmark = pytest.mark.slow
QUICKSTART = str(EXAMPLES / "quickstart.yaml")


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("scope", ["lora", "pissa", "partial", "full"])
def test_plan_disk_estimate_matches_what_the_run_writes(scope: str, tmp_path: Path, tiny_model_dir) -> None:
    scopes = {"lora": "{lora: {r: 8, targets: qkvo}}", "partial": "{partial: {last_blocks: 2, lm_head: true}}"}
    scopes["pissa"] = "{lora: {r: 8, targets: qkvo, init: pissa}}"  # its adapter is saved at rank 16
    overrides = [f"output.dir={tmp_path}", f"scope={scopes.get(scope, 'full')}", "train.max_steps=3"]
    overrides += ["train.save_steps=1", "train.save_total_limit=2"]
    exp = load_experiment(QUICKSTART, overrides)
    disk = make_plan(exp).disk
    assert disk.checkpoints == 3  # three saves, two kept, and a third written before the oldest goes
    run_dir = train(exp).run_dir
    kept = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in kept] == ["checkpoint-2", "checkpoint-3"]
    last = kept[-1]
    weights = last / ("adapter_model.safetensors" if scope in ("lora", "pissa") else "model.safetensors")
    header = 16 * 1024  # safetensors' JSON header of tensor names
    assert 0 <= size(weights) - disk.checkpoint_weights_bytes < header
    assert abs(size(last / "optimizer.pt") - disk.checkpoint_optimizer_bytes) < 0.05 * disk.checkpoint_optimizer_bytes
    # The rest is the tokenizer and small files (state, configs, a README), for which the estimate allows a fixed
    # amount: an upper bound by at most that allowance.
    assert disk.checkpoint_bytes - SMALL_FILES <= size(last) <= disk.checkpoint_bytes
    result = run_dir / read_manifest(run_dir).result
    written = size(result) + size(run_dir / "tokenizer")
    assert disk.result_bytes - SMALL_FILES <= written <= disk.result_bytes
    # A checkpoint holds what trains: the adapter, the opened tensors (not the frozen rest), or the whole model.
    planned = make_plan(exp).scope
    assert disk.checkpoint_weights_bytes == planned.trainable_params * 4  # float32 on this CPU
    assert (planned.trainable_params == planned.total_params) == (scope == "full")
    if scope == "partial":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as saved:
            assert sorted(saved.keys()) == sorted(planned.trainable_names)


def test_a_run_that_cannot_fit_on_its_disk_is_refused_before_anything_loads(tmp_path: Path) -> None:
    # Ten million checkpoints kept: terabytes, more than any test machine's disk holds.
    many = ["--set", "train.max_steps=10000000", "--set", "train.save_steps=1"]
    many += ["--set", "train.save_total_limit=10000000", "--set", f"output.dir={tmp_path}"]
    planned = run_cli("plan", QUICKSTART, *many)
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "warning: output.dir: the run writes up to" in planned.stdout
    trained = run_cli("train", QUICKSTART, *many)
    assert trained.returncode == 2
    (line,) = trained.stderr.strip().splitlines()
    assert "output.dir: the run writes up to" in line and "10000000 checkpoints of" in line
    assert "lower train.save_total_limit (now 10000000), or set output.dir to a larger disk" in line
    assert list(tmp_path.iterdir()) == []  # no run folder, no lock: nothing started
    # Checkpointing at each epoch's end, ten million steps would write 227,273 checkpoints; train.save_minutes may
    # write one after any step of a run that long, and the refusal names it.
    epochs = ["train.max_steps=10000000", "train.save_total_limit=10000000", f"output.dir={tmp_path}"]
    timed = make_plan(load_experiment(QUICKSTART, epochs))
    assert timed.disk.checkpoints == 10_000_000 and timed.schedule.per_epoch == 44
    (line,) = [w for w in timed.warnings if w.startswith("output.dir: the run writes up to")]
    assert "(now 10000000), set train.save_minutes: null to checkpoint only as scheduled, or set output.dir" in line
    scheduled = make_plan(load_experiment(QUICKSTART, [*epochs, "train.save_minutes=null"]))
    assert scheduled.disk.checkpoints == 227_273  # 10,000,000 / 44, rounded up
    (line,) = [w for w in scheduled.warnings if w.startswith("output.dir: the run writes up to")]
    assert "save_minutes" not in line


@pytest.mark.skipif(not can_mount_small_disks(), reason="needs `unshare -Urm` and tmpfs mounts (user namespaces)")
def test_a_disk_that_fills_mid_run_fails_in_one_line_and_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    # An 8 MiB disk of its own (tmpfs, mounted in a private namespace): room for the run (plan: 4.8 MiB) until,
    # after step 7, a file takes all but 300 kB; the checkpoint at step 10 (1.6 MiB) then cannot be written.
    mnt, host = tmp_path / "mnt", tmp_path / "host"
    mnt.mkdir()
    host.mkdir()
    steps = ["--set", "train.max_steps=12", "--set", "train.save_steps=5", "--set", "train.logging_steps=1"]
    args = " ".join([QUICKSTART, *steps, "--set", f"output.dir={mnt}/runs"])
    py = sys.executable
    script = f"""
mount -t tmpfs -o size=8m tmpfs {mnt} || exit 99
{py} {REPO}/tests/fail_mid_run.py 7 --fill-disk 300000 {args} > {host}/filled.out 2> {host}/filled.err
echo $? > {host}/filled.rc
cp -r {mnt}/runs/quickstart {host}/failed
rm {mnt}/runs/filler
{py} -m tunelab train {args} --resume > {host}/resumed.out 2>&1
echo $? > {host}/resumed.rc
cp -r {mnt}/runs/quickstart {host}/resumed
"""
    done = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", script],
        cwd=SCRATCH / "cwd",
        timeout=600,
        text=True,
        capture_output=True,
        env={"PYTHONPATH": str(REPO), **__import__("os").environ},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (host / "filled.rc").read_text().strip() == "2", (host / "filled.err").read_text()[-3000:]
    errors = [line for line in (host / "filled.err").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in (host / "filled.err").read_text()
    assert "no space left on device while writing checkpoint-10" in errors[0]
    assert "--resume: it goes on from checkpoint-5" in errors[0]
    failed = host / "failed"
    manifest = json.loads((failed / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"] == "no space left on device while writing checkpoint-10"
    assert [p.name for p in (failed / "checkpoints").glob("checkpoint-*")] == ["checkpoint-5"]
    assert not [p.name for p in failed.rglob(".*.tmp")]
    assert (host / "resumed.rc").read_text().strip() == "0", (host / "resumed.out").read_text()[-3000:]
    assert "resuming from checkpoint-5" in (host / "resumed.out").read_text()
    straight = train(load_experiment(QUICKSTART, [*steps[1::2], f"output.dir={tmp_path / 'straight'}"]))
    a, b = trained_tensors(straight.run_dir), trained_tensors(host / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_running_out_of_memory_names_the_fix_and_a_resume_with_it_ends_where_the_straight_run_ends(
    tmp_path: Path,
) -> None:
    steps = ["--set", "train.max_steps=12", "--set", "train.save_steps=5", "--set", "train.logging_steps=1"]
    args = [QUICKSTART, *steps, "--set", f"output.dir={tmp_path}"]
    oom = run_python([str(REPO / "tests" / "fail_mid_run.py"), "7", "--oom", *args], SCRATCH / "cwd", 600)
    assert oom.returncode == 2, oom.stderr[-3000:]
    (line,) = [x for x in oom.stderr.splitlines() if x.startswith("error:")]
    assert "Traceback" not in oom.stderr
    assert line == (
        f"error: {tmp_path / 'quickstart'}: cpu ran out of memory after 7 optimizer steps (it asked for 2.00 GiB "
        "more); set train.gradient_checkpointing: on or lower train.micro_batch_size (now 2), and run the same "
        "`tunelab train` with --resume (these change how it computes, not what): it goes on from checkpoint-5"
    )
    assert read_manifest(tmp_path / "quickstart").status == "failed"
    # What changes the experiment is still refused, and named.
    refused = run_cli("train", *args, "--set", "train.learning_rate=0.001", "--resume")
    assert refused.returncode == 2
    assert "the experiment changed (train.learning_rate 0.003 -> 0.001)" in refused.stderr
    fitted = ["--set", "train.gradient_checkpointing=on", "--set", "train.micro_batch_size=1"]
    resumed = run_cli("train", *args, *fitted, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-5" in resumed.stdout
    manifest = read_manifest(tmp_path / "quickstart")
    assert manifest.status == "completed" and manifest.forced_resume is None and manifest.gradient_checkpointing
    assert manifest.resumed_with == [
        "train.gradient_checkpointing: 'auto' -> 'on'",
        "train.micro_batch_size: None -> 1",
    ]
    assert load_experiment(tmp_path / "quickstart" / "experiment.yaml").train.micro_batch_size == 1
    straight = train(load_experiment(QUICKSTART, [*steps[1::2], f"output.dir={tmp_path / 'straight'}"]))
    # One example a forward pass instead of two sums the same numbers in another order: equal up to rounding.
    assert relative_distance(trained_tensors(tmp_path / "quickstart"), trained_tensors(straight.run_dir)) < 1e-4


def test_prune_removes_only_completed_runs_checkpoints_and_the_results_stay_usable(tmp_path: Path) -> None:
    from tests.conftest import fake_run

    run = train(load_experiment(QUICKSTART, [f"output.dir={tmp_path}", "train.max_steps=4", "train.save_steps=2"]))
    result = trained_tensors(run.run_dir)
    held = sum(p.stat().st_size for p in (run.run_dir / "checkpoints").rglob("*") if p.is_file())
    failed = fake_run(tmp_path, "failed-run", status="failed")
    (failed / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    # A run that is not completed keeps its checkpoints, and nothing else is removed either.
    refused = run_cli("prune", str(run.run_dir), str(failed))
    assert refused.returncode == 2 and "failed-run: run failed, not completed; the same tunelab train" in refused.stderr
    assert (
        "nothing was removed, since --resume goes on from its checkpoints: finish it, or leave it out" in refused.stderr
    )
    assert (run.run_dir / "checkpoints" / "checkpoint-4").is_dir() and (failed / "checkpoints").is_dir()
    dry = run_cli("prune", str(run.run_dir), "--dry-run")
    assert dry.returncode == 0 and "would remove 2 checkpoints" in dry.stdout
    assert (run.run_dir / "checkpoints").is_dir()
    listed = json.loads(run_cli("runs", str(tmp_path), "--json").stdout)
    before = next(r for r in listed if r["name"] == "quickstart")["disk_bytes"]
    pruned = run_cli("prune", str(run.run_dir))
    assert pruned.returncode == 0, pruned.stderr
    assert not (run.run_dir / "checkpoints").exists()
    manifest = read_manifest(run.run_dir)
    assert manifest.status == "completed"
    assert (manifest.checkpoints_pruned["checkpoints"], manifest.checkpoints_pruned["bytes"]) == (
        ["checkpoint-2", "checkpoint-4"],
        held,
    )
    listed = json.loads(run_cli("runs", str(tmp_path), "--json").stdout)
    after = next(r for r in listed if r["name"] == "quickstart")["disk_bytes"]
    assert 0 < after - (before - held) < 1024  # what the manifest's record of the pruning adds
    kept = trained_tensors(run.run_dir)  # the result is untouched, and what compare, eval and export read
    assert kept.keys() == result.keys() and all(torch.equal(kept[k], result[k]) for k in kept)
