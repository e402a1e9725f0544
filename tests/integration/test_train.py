"""Real SFT runs on the built-in model: what changes, what is saved, what repeats."""

import os
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, relative_distance, run_cli, straight_and_killed, trained_tensors
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.export import model_card
from tunelab.plan import make_plan
from tunelab.runs import last_checkpoint, read_manifest, read_metrics
from tunelab.scopes import load_trained
from tunelab.train import train

pytestmark = pytest.mark.slow
SEED_EXAMPLES = ["lora-qv", "lora-qkvo", "lora-all-linear", "lora-last-half", "partial-last4"]


def experiment(example: str, tmp_path: Path, *overrides: str):
    return load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize("example", SEED_EXAMPLES)
def test_seed_example_trains_exactly_the_planned_tensors(example: str, tmp_path: Path, tiny_model_dir) -> None:
    exp = experiment(example, tmp_path, "train.max_steps=3", "train.logging_steps=1")
    plan = make_plan(exp)
    result = train(exp)
    m = result.manifest
    assert m.status == "completed"
    assert m.trainable_params == plan.scope.trainable_params
    check = m.change_check
    assert check.ok and check.frozen_changed == [] and check.trainable_unchanged == []
    assert check.trainable_changed == len(plan.scope.trainable_names)
    saved = trained_tensors(result.run_dir)
    assert sum(t.numel() for t in saved.values()) == plan.scope.trainable_params
    if exp.scope.kind == "partial":
        assert sorted(saved) == sorted(plan.scope.trainable_names)
        assert exp.train.learning_rate == 5e-6 and exp.train.epochs == 2
    else:
        layers = {int(k.split(".layers.")[1].split(".")[0]) for k in saved}
        assert sorted(layers) == plan.scope.layers
    assert [r["step"] for r in read_metrics(result.run_dir) if "loss" in r] == [1, 2, 3]


def test_quickstart_learns_and_records_base_loss(tmp_path: Path, tiny_model_dir) -> None:
    result = train(experiment("quickstart", tmp_path))
    m = result.manifest
    assert m.final_eval_loss <= 0.6 * m.base_eval_loss, (m.base_eval_loss, m.final_eval_loss)
    assert m.base_model.fingerprint and m.chat_template_hash
    assert m.data.hashes and m.versions["trl"] and m.device == "cpu" and m.seed == 42
    assert m.started_at <= m.ended_at
    # On CPU the peak is the process's resident memory: more than the weights it held, less than the machine.
    assert m.peak_memory_measure == "process peak RSS"
    assert m.estimated_memory_bytes < m.peak_memory_bytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = read_metrics(result.run_dir)
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(rows[-3]) | set(rows[-2])
    assert any("eval_loss" in r for r in rows)
    resolved = (result.run_dir / "experiment.yaml").read_text()
    assert "gradient_checkpointing: auto" in resolved and "max_grad_norm" in resolved
    assert (result.run_dir / "tokenizer" / "chat_template.jinja").is_file()


def test_adapter_loads_with_plain_peft_and_matches_tunelab_loader(tmp_path: Path, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(experiment("lora-qkvo", tmp_path, "train.max_steps=4"))
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.run_dir / "adapter")
    )
    ours = load_trained(result.run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        a, b, c = plain.eval()(ids).logits, ours.eval()(ids).logits, base.eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4  # the adapter does something


def test_partial_loader_puts_tensors_on_the_base(tmp_path: Path, tiny_model_dir) -> None:
    result = train(experiment("partial-last4", tmp_path, "train.max_steps=2", "train.learning_rate=1e-3"))
    model = load_trained(result.run_dir)
    saved = trained_tensors(result.run_dir)
    params = dict(model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name], tensor)


def test_identical_reruns(tmp_path: Path, tiny_model_dir) -> None:
    runs = [
        train(
            experiment("lora-all-linear", tmp_path, "train.max_steps=6", "train.logging_steps=1", f"output.name=r{i}")
        )
        for i in range(2)
    ]
    losses = [[r["loss"] for r in read_metrics(x.run_dir) if "loss" in r] for x in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    a, b = (trained_tensors(x.run_dir) for x in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_and_keeps_the_run(tmp_path: Path, tiny_model_dir) -> None:
    exp = experiment("lora-qv", tmp_path, "train.max_steps=1")
    first = train(exp)
    before = (first.run_dir / "manifest.json").read_text()
    with pytest.raises(TunelabError, match="a completed run is already there; use --overwrite"):
        train(exp)
    assert (first.run_dir / "manifest.json").read_text() == before
    with pytest.raises(TunelabError, match="already completed; nothing to resume"):
        train(exp, resume=True)
    again = train(exp, overwrite=True)
    assert again.manifest.status == "completed" and again.manifest.started_at >= first.manifest.started_at


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, tiny_model_dir) -> None:
    # 29 steps an epoch: the crash falls in the second epoch, so the resumed sampler must replay epoch 1's order.
    steps = ["--set", "train.max_steps=36", "--set", "train.save_steps=32", "--set", "train.logging_steps=1"]
    crashed, killed = straight_and_killed("lora-qv", 32, tmp_path, *steps)
    assert killed == -9
    assert read_manifest(tmp_path / "crashed").status == "running"
    shown = run_cli("show", str(tmp_path / "crashed")).stdout.splitlines()  # the OS let go of the dead run's lock
    assert shown[0].startswith("crashed  died  sft") and re.fullmatch(r"step 3[2-6] of 36 logged \(\d+%\)", shown[2])
    assert "no process trains it" in shown[3]
    assert shown[4] == "resume: the same tunelab train command with --resume continues from checkpoint-32 (step 32)"
    refused = run_cli(*crashed)
    assert refused.returncode == 2 and "use --resume" in refused.stderr
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-32" in resumed.stdout  # a resume, not a restart that happens to agree
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "crashed") if "loss" in r]
    assert steps == list(range(1, 37))
    losses = [[r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("straight", "crashed")]
    assert losses[0] == losses[1]


def test_a_crash_after_the_last_checkpoint_resumes_without_an_extra_step(tmp_path: Path, tiny_model_dir) -> None:
    """Killed after the final checkpoint, before the result was saved: resume saves that checkpoint's weights."""
    steps = ["--set", "train.max_steps=6", "--set", "train.save_steps=3", "--set", "train.logging_steps=1"]
    crashed, killed = straight_and_killed("lora-qv", 6, tmp_path, *steps)
    assert killed == -9 and not (tmp_path / "crashed" / "adapter").exists()
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step 7/6" not in resumed.stdout
    assert read_manifest(tmp_path / "crashed").global_steps == 6
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "crashed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, crashed_m = read_manifest(tmp_path / "straight"), read_manifest(tmp_path / "crashed")
    assert crashed_m.final_eval_loss == straight.final_eval_loss
    assert crashed_m.base_eval_loss == straight.base_eval_loss


@pytest.mark.parametrize(("signal_name", "code", "why"), [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_a_signal_marks_the_run_and_exits_with_its_code(
    signal_name: str, code: int, why: str, tmp_path: Path, tiny_model_dir
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "tunelab", "train", str(EXAMPLES / "quickstart.yaml")]
    command += ["--set", f"output.dir={tmp_path}", "--set", "train.epochs=100", "--set", "train.logging_steps=1"]
    command += ["--set", "train.save_steps=2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "quickstart"
    deadline = time.time() + 300
    while not (run_dir.is_dir() and last_checkpoint(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, getattr(signal, signal_name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] in ("interrupted", "terminated")
    manifest = read_manifest(run_dir)
    assert manifest.status == "interrupted" and why in manifest.error
    # where it goes on from, said as it stops and by show
    (said,) = [line for line in err.splitlines() if line.startswith(f"{run_dir}: {manifest.error}; ")]
    assert re.search(
        r"; the same tunelab train command with --resume continues from checkpoint-(\d+) \(step \1\)$", said
    )
    shown = run_cli("show", str(run_dir))
    assert said.split("; ", 1)[1] in shown.stdout.replace("resume: ", "")


def test_no_checkpoint_holds_non_finite_weights(tmp_path: Path, tiny_model_dir) -> None:
    """A step that makes the weights infinite still logs a finite loss (computed before the update)."""
    from safetensors.torch import load_file

    exp = experiment(
        "quickstart",
        tmp_path,
        "train.learning_rate=1e39",
        "train.max_grad_norm=1e30",
        "train.max_steps=4",
        "train.save_steps=1",
        "train.logging_steps=1",
    )
    with pytest.raises(TunelabError, match=r"training stopped: .* at step 1; lower train.learning_rate"):
        train(exp)
    for ckpt in (tmp_path / "runs" / "quickstart" / "checkpoints").glob("checkpoint-*"):
        weights = load_file(str(ckpt / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), ckpt.name


def test_bad_data_fails_cleanly_without_a_run(tmp_path: Path, tiny_model_dir) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    out = run_cli(
        "train",
        str(EXAMPLES / "quickstart.yaml"),
        "--set",
        f"data.train={bad}",
        "--set",
        f"output.dir={tmp_path / 'runs'}",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {bad}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    assert not (tmp_path / "runs" / "quickstart").exists()
    out = run_cli("train", str(EXAMPLES / "quickstart.yaml"), "--set", "train.batch_size=-1")
    assert out.returncode == 2 and "train.batch_size: Input should be greater than 0" in out.stderr
    assert "Traceback" not in out.stderr


def test_nan_loss_stops_and_marks_run_failed(tmp_path: Path, tiny_model_dir) -> None:
    exp = experiment(
        "quickstart",
        tmp_path,
        "train.learning_rate=1e30",  # LoRA B @ A at 1e60 overflows float32 on any CPU; 1e12 stayed finite on one
        "train.max_steps=30",
        "train.logging_steps=1",
        "train.max_grad_norm=1e30",
        "scope.lora.dropout=0.0",
    )
    with pytest.raises(TunelabError, match="the loss became"):
        train(exp)
    manifest = read_manifest(tmp_path / "runs" / "quickstart")
    assert manifest.status == "failed" and "the loss became" in manifest.error


def test_batching_changes_the_work_not_the_math(tmp_path: Path, tiny_model_dir) -> None:
    """Padding-free rows and length-balanced micro-batches see the same examples per step as one padded
    batch, so the step losses and the trained adapter agree; length grouping draws other batches."""

    def run(name: str, *overrides: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        result = train(
            experiment(
                "quickstart", tmp_path, "train.max_steps=4", "train.logging_steps=1", f"output.name={name}", *overrides
            )
        )
        losses = [r["loss"] for r in read_metrics(result.run_dir) if "loss" in r]
        return losses, trained_tensors(result.run_dir)

    default_losses, default_weights = run("default")  # padding-free, 4 forward passes of 2 (batch_size 8)
    assert len(default_losses) == 4
    for name, overrides in {
        "one-pass": ["train.micro_batch_size=8"],
        "single": ["train.micro_batch_size=1"],
        "padded": ["train.padding_free=off"],
    }.items():
        losses, weights = run(name, *overrides)
        assert losses == pytest.approx(default_losses, rel=1e-5), name
        # Summation order differs, and Adam magnifies that on near-zero gradients: compare the whole update.
        assert relative_distance(weights, default_weights) < 1e-4, name
    grouped, grouped_weights = run("grouped", "train.group_by_length=true")
    assert grouped[1:] != pytest.approx(default_losses[1:], rel=1e-3)
    assert relative_distance(grouped_weights, default_weights) > 1e-2


def test_padding_free_rows_keep_truncation_and_isolation(tmp_path: Path, tiny_model_dir) -> None:
    """TRL refuses padding_free with a max_length; tunelab's collator route must still truncate."""
    from tunelab.data import load_splits
    from tunelab.inputs import encode_split
    from tunelab.methods.common import Hardware
    from tunelab.methods.sft import build_trainer
    from tunelab.models import load_model, load_tokenizer
    from tunelab.scopes import apply_scope

    exp = experiment("quickstart", tmp_path, "train.max_length=24")
    splits = load_splits(exp.data, exp.method, exp.train.seed)
    tokenizer = load_tokenizer(exp.tokenizer, exp.model)
    rows = encode_split(exp, tokenizer, splits.train).dataset()
    model, _ = apply_scope(load_model(exp.model, torch.float32, "cpu"), exp.scope)
    hw = Hardware(device="cpu", dtype=torch.float32, gradient_checkpointing=False)
    trainer = build_trainer(model, tokenizer, rows, None, exp.train, hw, tmp_path / "ck", [])
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one row, no padding
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    lengths = [b - a for a, b in zip(starts, [*starts[1:], batch["input_ids"].shape[1]], strict=True)]
    assert len(lengths) == 2 and max(lengths) <= 24  # micro-batch of 2 examples, each truncated
    assert batch["labels"][0, starts].eq(-100).all()  # no example learns its first token from the previous one


def test_partial_checkpoints_hold_the_opened_tensors_and_resume_exactly(tmp_path: Path, tiny_model_dir) -> None:
    from safetensors import safe_open

    from tests.conftest import resume_matches_straight

    # Two of four blocks open: the frozen half and the embeddings stay out of every checkpoint.
    resume_matches_straight("partial-last4", tmp_path, "--set", "scope.partial.last_blocks=2")
    opened = make_plan(experiment("partial-last4", tmp_path, "scope.partial.last_blocks=2")).scope.trainable_names
    with safe_open(str(tmp_path / "crashed" / "checkpoints" / "checkpoint-6" / "model.safetensors"), "pt") as saved:
        assert sorted(saved.keys()) == sorted(opened)
    assert not any(".layers.0." in name or ".layers.1." in name for name in opened)


@pytest.mark.parametrize("example", ["quickstart", "dpo"])
def test_data_tokenized_in_several_processes_trains_the_same_weights(
    example: str, tmp_path: Path, tiny_model_dir
) -> None:
    """train.data_workers: SFT rows tokenized by tunelab in spawned processes, DPO pairs by TRL's dataset_num_proc;
    the same steps and weights as in one process."""
    results = {}
    for workers in (1, 2):
        exp = experiment(example, tmp_path / str(workers), "train.max_steps=3", f"train.data_workers={workers}")
        results[workers] = train(exp)
    one, two = (trained_tensors(results[w].run_dir) for w in (1, 2))
    assert sorted(one) == sorted(two) and all(torch.equal(one[k], two[k]) for k in one)
    losses = [[r.get("loss") for r in read_metrics(results[w].run_dir)] for w in (1, 2)]
    assert losses[0] == losses[1] and any(x is not None for x in losses[0])
    if example == "dpo":  # the setting reaches TRL; unset, a small dataset is tokenized in one process
        from tunelab.methods.common import Hardware
        from tunelab.methods.preference import preference_arguments

        hw = Hardware("cpu", torch.float32, False)
        for setting, expected in ((2, 2), (None, 1)):
            train_settings = exp.train.model_copy(update={"data_workers": setting})
            assert preference_arguments(train_settings, hw, tmp_path, False, "dpo", 40)["dataset_num_proc"] == expected


def test_more_held_out_sets_are_scored_beside_the_eval_data(tmp_path: Path, tiny_model_dir) -> None:
    """data.eval_also: each set's loss at every evaluation as eval_<name>_loss, the eval data's staying eval_loss
    (which keep: best follows); a set that is the eval data scores exactly its loss, TRL's token accuracy included;
    the manifest keeps each set's loss before training and of the result (the best checkpoint's)."""
    import json

    rows = [json.loads(line) for line in (EXAMPLES / "data" / "sft_train.jsonl").read_text().splitlines()]
    general = tmp_path / "general.jsonl"  # the training chats' replies as Alpaca rows: another shape, held out
    general.write_text(
        "".join(
            json.dumps({"instruction": r["messages"][-2]["content"], "output": "No idea."}) + "\n" for r in rows[:16]
        )
    )
    also = f"data.eval_also={{same: {EXAMPLES / 'data' / 'sft_eval.jsonl'}, general: {general}}}"
    exp = experiment(
        "quickstart", tmp_path, also, "train.max_steps=6", "train.eval_steps=2", "train.keep=best", "train.early_stop=3"
    )
    plan = make_plan(exp)
    assert (plan.data.also["same"].examples, plan.data.also["general"].examples) == (40, 16)
    m = train(exp).manifest
    logged = read_metrics(Path(exp.output.dir) / exp.run_name)
    by_step = {}
    for r in logged:
        by_step.setdefault(r.get("step"), {}).update(r)
    evaluated = [step for step, r in sorted(by_step.items()) if "eval_loss" in r]
    assert evaluated == [0, 2, 4, 6]
    for step in evaluated:
        r = by_step[step]
        assert r["eval_same_loss"] == r["eval_loss"] and r["eval_general_loss"] != r["eval_loss"]
        assert r["eval_same_mean_token_accuracy"] == r["eval_mean_token_accuracy"]
    assert not any("eval_mean_token_accuracy" in r and "eval_general_loss" in r for r in logged)
    assert m.eval_also_losses["same"] == {"base": m.base_eval_loss, "final": m.final_eval_loss}
    best = by_step[m.best_step]
    assert (
        m.final_eval_loss == best["eval_loss"] and m.eval_also_losses["general"]["final"] == best["eval_general_loss"]
    )
    # early stopping follows eval_loss alone, and does not say it is off when another set's metrics come in
    assert "early stopping is disabled" not in (Path(exp.output.dir) / exp.run_name / "train.log").read_text()
    from tunelab.runs import list_runs

    listed = {name: losses["final"] for name, losses in m.eval_also_losses.items()}
    assert [r["eval_also_losses"] for r in list_runs(Path(exp.output.dir))] == [listed]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            [
                "method=dpo",
                f"data.train={EXAMPLES / 'data' / 'pref_train.jsonl'}",
                f"data.eval={EXAMPLES / 'data' / 'pref_eval.jsonl'}",
            ],
            "data.eval_also: TRL's DPO trainer scores one held-out set",
        ),
        (["data.eval=null"], "data.eval_also: scores beside the eval data, and there is none"),
    ],
)
def test_more_held_out_sets_need_sft_and_eval_data(tmp_path: Path, overrides: list[str], expected: str) -> None:
    with pytest.raises(TunelabError, match=expected):
        experiment(
            "quickstart", tmp_path, f"data.eval_also={{more: {EXAMPLES / 'data' / 'sft_eval.jsonl'}}}", *overrides
        )
    with pytest.raises(TunelabError, match=r"data.eval_also: 'eval' names the eval data"):
        experiment("quickstart", tmp_path, f"data.eval_also={{eval: {EXAMPLES / 'data' / 'sft_eval.jsonl'}}}")
    exp = experiment("quickstart", tmp_path, f"data.eval_also={{seen: {EXAMPLES / 'data' / 'sft_train.jsonl'}}}")
    with pytest.raises(TunelabError, match=r"^data.eval_also.seen: '.*sft_train.jsonl' is also a training file"):
        make_plan(exp)


def test_neftune_noises_the_training_steps_only_and_the_same_way_on_a_rerun(tmp_path: Path, tiny_model_dir) -> None:
    """train.neftune (Transformers' NEFTune): noise on the input embeddings in training steps, so the weights move
    otherwise than without it; none in evaluation (the base's eval loss, measured before the first step, is the
    same); the same noise on a rerun (seeded); padded batches, as padding_free auto gives way to it."""
    steps = ("train.max_steps=6", "train.logging_steps=1", "train.padding_free=off")
    plain = train(experiment("lora-all-linear", tmp_path, *steps, "output.name=plain"))
    noisy = [
        train(experiment("lora-all-linear", tmp_path, *steps[:2], "train.neftune=5", f"output.name=noisy{i}"))
        for i in range(2)
    ]
    a, b, c = (trained_tensors(x.run_dir) for x in (plain, *noisy))
    assert all(torch.equal(b[k], c[k]) for k in b)  # the same noise on a rerun
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every trained tensor took the noisy gradients
    manifests = [read_manifest(x.run_dir) for x in (plain, *noisy)]
    assert manifests[0].base_eval_loss == manifests[1].base_eval_loss  # no noise in evaluation
    assert manifests[0].final_eval_loss != manifests[1].final_eval_loss
    assert manifests[1].batching is not None and manifests[1].batching["padding_free"] is False
    assert "| NEFTune | noise alpha 5 |" in model_card(noisy[0].run_dir, manifests[1], "adapter")
    assert "NEFTune" not in model_card(plain.run_dir, manifests[0], "adapter")
    with pytest.raises(TunelabError, match=r"train.neftune: applies to SFT"):
        experiment("dpo", tmp_path, "train.neftune=5")


def test_a_run_keeps_what_plan_said_of_its_rows_and_show_prints_it(tmp_path: Path) -> None:
    lines = (EXAMPLES / "data" / "sft_train.jsonl").read_text().splitlines()
    data, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("\n".join([*lines, lines[3]]) + "\n")  # the fourth row twice
    held.write_text("\n".join([*(EXAMPLES / "data" / "sft_eval.jsonl").read_text().splitlines()[:9], lines[7]]) + "\n")
    exp = experiment("quickstart", tmp_path, f"data.train={data}", f"data.eval={held}", "train.max_steps=1")
    said = make_plan(exp).data.overlap
    assert said == [
        f"data.train: 1 of {len(lines) + 1} rows repeat an earlier training row (first: {data}:{len(lines) + 1} "
        f"repeats {data}:4); each copy trains again, so remove the copies unless the repeat is meant",
        f"data.eval: 1 of 10 held-out rows are training rows too (first: {held}:10 is {data}:8); what is measured "
        "on them is partly recall of the training data: remove them from one side",
    ]
    run_dir = train(exp).run_dir
    assert read_manifest(run_dir).data.overlap == said
    shown = run_cli("show", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    printed = " ".join(shown.stdout.split())
    assert all(f"warning: {w}" in printed for w in said) and printed.count("warning: data.") == 2


def test_timed_checkpoints_fall_between_the_scheduled_ones_and_a_run_resumes_from_one(tmp_path: Path) -> None:
    """train.save_minutes checkpoints a step once its minutes have passed since the last checkpoint, beside the
    epoch's end (29 steps here): with a moment's worth, every step. A run killed right after such a checkpoint, mid
    epoch, resumes from it to the uninterrupted run's weights and losses."""
    steps = ["--set", "train.max_steps=8", "--set", "train.save_minutes=1e-9", "--set", "train.logging_steps=1"]
    steps += ["--set", "train.save_total_limit=100"]
    crashed, killed = straight_and_killed("lora-qv", 5, tmp_path, *steps)
    assert killed == -9
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "straight" / "checkpoints").glob("checkpoint-*"))
    assert saved == list(range(1, 9))
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-5" in resumed.stdout
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("straight", "crashed")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_plan_counts_the_optimizer_steps_a_run_takes(tmp_path: Path) -> None:
    """plan's steps are the Trainer's: a fraction of an epoch of batches of 6 (3 forward passes of 2) ends at the
    step the run ends at, and without save_minutes the checkpoints fall at the epoch's end only."""
    settings = [f"output.dir={tmp_path}", "train.epochs=0.3", "train.batch_size=6", "train.save_minutes=null"]
    exp = load_experiment(EXAMPLES / "lora-qv.yaml", settings)
    planned = make_plan(exp)
    s = planned.schedule
    assert s.per_epoch == -(-planned.data.train.examples // 6) and s.steps == -(-3 * s.per_epoch // 10)
    result = train(exp)
    assert result.manifest.global_steps == s.steps
    saved = [p.name for p in (result.run_dir / "checkpoints").glob("checkpoint-*")]
    assert saved == [f"checkpoint-{s.steps}"]
