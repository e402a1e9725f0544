"""On-policy distillation on the built-in model: the teacher is an SFT run (the quickstart), the data the questions
alone. The student learns the teacher's answers from its distributions (held-out expectations and the SFT eval loss
move to the teacher's), a student that is its teacher starts at a divergence of zero, the planned teacher memory is
its weights, a resume after SIGKILL ends with the same weights, and a teacher that does not fit or changed is
refused in one line."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA, EXAMPLES, fake_run, kept_rollouts, resume_matches_straight, run_cli, write_experiment
from tunelab.compare import compare
from tunelab.config import load_experiment
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import fingerprint
from tunelab.plan import make_plan
from tunelab.runs import lock_run, read_manifest, read_metrics
from tunelab.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir) -> Path:
    """The quickstart SFT run: it answers the tiny world's questions with their fact sentence."""
    out = tmp_path_factory.mktemp("teacher")
    return train(load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={out}"])).run_dir


def _distill(tmp_path: Path, teacher: Path, *overrides: str):
    return load_experiment(
        EXAMPLES / "distill.yaml", [f"output.dir={tmp_path}", f"distill.teacher={teacher}", *overrides]
    )


def test_a_student_learns_its_teachers_answers_from_the_questions_alone(tmp_path: Path, teacher: Path) -> None:
    exp = _distill(tmp_path, teacher)
    plan = make_plan(exp)
    # the teacher's weights beside the student, in its dtype (float32 on CPU): the base's parameters, merged
    assert plan.memory.teacher == f"run {teacher.name}"
    assert plan.memory.teacher_bytes == (plan.scope.total_params - plan.scope.trainable_params) * 4
    assert plan.memory.sampling_bytes > 0
    assert "every reply token scored by the reverse KL to teacher" in plan.method_line
    m = train(exp).manifest
    assert m.status == "completed" and m.method == "distill" and m.change_check.ok
    prompts = sum(1 for _ in (DATA / "distill_train.jsonl").open())
    assert m.global_steps == math.ceil(prompts / exp.train.batch_size) * exp.train.epochs
    assert m.teacher.id == str(teacher) and len(m.teacher.fingerprint) == 16
    # the held-out measure is the divergence from the teacher on replies sampled for the eval prompts
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "distill") if "eval_loss" in r]
    assert evals[0] == m.base_eval_loss and evals[-1] == m.final_eval_loss
    assert m.final_eval_loss < 0.3 * m.base_eval_loss
    # each evaluation's replies are kept whole: one to each held-out question (TRL's log keeps its last batch)
    evaluations = [replies for (kind, _), replies in kept_rollouts(tmp_path / "distill").items() if kind == "eval"]
    held_out = sum(1 for _ in (DATA / "distill_eval.jsonl").open())
    assert len(evaluations) == len(evals) and all(len(replies) == held_out for replies in evaluations)
    shown = run_cli("show", str(tmp_path / "distill"))
    assert f"teacher {teacher} (fingerprint {m.teacher.fingerprint})" in shown.stdout
    assert "divergence from the teacher on replies sampled for held-out prompts" in shown.stdout
    exported = run_cli("export", str(tmp_path / "distill"), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    card = (tmp_path / "export" / "README.md").read_text()
    divergence = f"| eval divergence from the teacher | {m.base_eval_loss:.4g} | {m.final_eval_loss:.4g} |"
    assert divergence in card and f"| teacher | {teacher} (fingerprint `{m.teacher.fingerprint}`) |" in card

    # No answer was in its data; its greedy answers to held-out questions meet the teacher's expectations, and its
    # loss on the teacher's held-out SFT chats falls towards the teacher's. Compared alone, its teacher answers beside
    # it (loaded on its own, merged), as the same run does compared as a run (its adapter attached to the base).
    c = compare([tmp_path / "distill"], prompts_file=DATA / "prompts.jsonl", max_new_tokens=24)
    assert [(v.name, v.kind) for v in c.variants] == [("base", "base"), ("distill", "lora"), ("teacher", "teacher")]
    passed = {v.name: v.numbers["expectation_pass_rate"] for v in c.variants}
    loss = {v.name: v.numbers["eval_loss"] for v in c.variants}
    assert passed["base"] == 0 and passed["distill"] > 0.5 and passed["distill"] >= passed["teacher"] - 0.2
    assert loss["distill"] < 0.5 * loss["base"]
    as_run = compare([teacher, tmp_path / "distill"], prompts_file=DATA / "prompts.jsonl", max_new_tokens=24)
    assert [v.name for v in as_run.variants] == ["base", teacher.name, "distill"]
    same = next(v for v in as_run.variants if v.name == teacher.name).numbers
    assert same["eval_loss"] == pytest.approx(loss["teacher"], rel=1e-3)
    assert same["expectation_pass_rate"] == passed["teacher"]


def test_a_student_that_is_its_teacher_starts_at_zero_divergence(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The base as a model folder teaches the base with a fresh adapter (zero update, dropout off): the two
    distributions are the same, so the first evaluation's divergence is 0 (up to float rounding)."""
    m = train(_distill(tmp_path, tiny_model_dir, "train.max_steps=1")).manifest
    assert m.base_eval_loss == pytest.approx(0, abs=1e-6)
    assert m.teacher.fingerprint == fingerprint(str(tiny_model_dir))


def test_a_4bit_teacher_is_planned_packed_and_teaches(tmp_path: Path, tiny_model_dir: Path) -> None:
    """distill.teacher_quantization loads the teacher through bitsandbytes: plan counts its decoder's linear weights
    packed (4 bits and their constants) and the rest in the run's dtype; the base in 4-bit teaching the base in
    float32 starts from a small divergence above 0, its rounding."""
    from tunelab.plan import quantized_bytes_per_param

    exp = _distill(tmp_path, tiny_model_dir, "distill.teacher_quantization={bits: 4}", "train.max_steps=1")
    plan = make_plan(exp)
    linear, total = plan.model.linear_params, plan.scope.total_params - plan.scope.trainable_params
    packed = int(linear * quantized_bytes_per_param(exp.distill.teacher_quantization)) + (total - linear) * 4
    assert plan.memory.teacher_bytes == packed < total * 4
    assert f"teacher {tiny_model_dir.name} (4-bit nf4 double-quant)" in plan.method_line
    m = train(exp).manifest
    assert m.status == "completed" and 0 < m.base_eval_loss < 0.1


def test_distill_resumes_after_sigkill_to_the_same_weights(tmp_path: Path, teacher: Path) -> None:
    resume_matches_straight("distill", tmp_path, "--set", f"distill.teacher={teacher}")


def test_a_resume_after_the_teacher_changed_is_refused(tmp_path: Path, teacher: Path) -> None:
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(teacher, tmp_path / "teacher")
    exp = _distill(tmp_path, copy, "train.max_steps=2")
    recorded = train(exp).manifest.teacher
    manifest = json.loads((tmp_path / "distill" / "manifest.json").read_text())
    (tmp_path / "distill" / "manifest.json").write_text(json.dumps(manifest | {"status": "interrupted"}))
    weights = copy / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: t + 1 if i == 0 else t for i, (k, t) in enumerate(tensors.items())}, weights)  # retrained
    with pytest.raises(TunelabError) as refused:
        train(exp, resume=True)
    assert f"the teacher changed ({copy} {recorded.fingerprint} -> " in str(refused.value)
    assert read_manifest(tmp_path / "distill").status == "interrupted"


def test_a_teacher_that_does_not_fit_the_student_is_refused_before_anything_loads(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    def refusal(teacher: Path | str) -> str:
        with pytest.raises(ConfigError) as e:
            make_plan(_distill(tmp_path, teacher))
        assert "\n" not in str(e.value)
        return str(e.value)

    # another vocabulary size: TRL compares the two heads' logits id by id
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 1}))
    assert refusal(wider) == (
        f"distill.teacher: 'wider' predicts over {config['vocab_size'] + 1} token ids and the student over "
        f"{config['vocab_size']}; distillation compares the two distributions id by id, so the teacher must share "
        "the student's vocabulary (a model of the same family and tokenizer, with embeddings of the same size)"
    )
    # the same size, another tokenizer: two tokens trade ids
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other, ignore=shutil.ignore_patterns("*.safetensors"))
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "Ġapples", "Molo"
    assert a in vocab and b in vocab
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "distill.teacher: 'other' has another tokenizer: 2 of the student's" in refusal(other)
    # the same tokenizer with a chat template of its own: planned, with a warning that it reads the student's
    shutil.copytree(tiny_model_dir, tmp_path / "templated", ignore=shutil.ignore_patterns("*.safetensors"))
    template = tmp_path / "templated" / "chat_template.jinja"
    template.write_text(template.read_text() + "{# the teacher's own #}")
    said = [w for w in make_plan(_distill(tmp_path, tmp_path / "templated")).warnings if w.startswith("distill.")]
    assert len(said) == 1 and "has a chat template of its own" in said[0]
    assert not [w for w in make_plan(_distill(tmp_path, tiny_model_dir)).warnings if w.startswith("distill.")]
    # a run that did not complete, a folder that is no model
    broken = fake_run(tmp_path, "broken", status="failed")
    assert f"run '{broken}' failed, not completed; the same tunelab train command with --resume" in refusal(broken)
    busy = fake_run(tmp_path, "busy", status="running")
    held = lock_run(tmp_path, "busy")  # as by the process that trains it
    assert f"run '{busy}' is running, not completed; wait for it to finish, or name another" in refusal(busy)
    os.close(held)  # as the OS lets go of a dead process's lock
    assert f"run '{busy}' died, not completed; the same tunelab train command with --resume" in refusal(busy)
    done = fake_run(tmp_path, "done")
    with pytest.raises(ConfigError, match=r"^distill.teacher_quantization: the run '.*done' teaches as it trained"):
        make_plan(_distill(tmp_path, done, "distill.teacher_quantization={bits: 4}"))
    (tmp_path / "empty").mkdir()
    assert "distill.teacher: no config.json in" in refusal(tmp_path / "empty")
    # the CLI: the teacher's row in the memory table, and no loss tokens to count in prompts alone
    shown = run_cli("plan", str(EXAMPLES / "distill.yaml"), "--set", f"distill.teacher={tiny_model_dir}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"teacher ({tiny_model_dir.name}, frozen)" in shown.stdout and "loss tokens" not in shown.stdout
    # the CLI: one line, exit 2
    planned = run_cli("plan", str(EXAMPLES / "distill.yaml"), "--set", f"distill.teacher={wider}")
    assert planned.returncode == 2 and "Traceback" not in planned.stderr and "predicts over" in planned.stderr


def test_a_stage_planned_before_its_teacher_run_exists_is_planned_with_a_warning(tmp_path: Path) -> None:
    plan = make_plan(_distill(tmp_path, tmp_path / "quickstart"))
    assert plan.memory.teacher is None and plan.memory.teacher_bytes == 0
    assert any(w.startswith(f"distill.teacher: '{tmp_path / 'quickstart'}' does not exist yet") for w in plan.warnings)
    with pytest.raises(TunelabError, match="method distill learns from a teacher model, and none is named"):
        load_experiment(write_experiment(tmp_path, (EXAMPLES / "distill.yaml").read_text().split("distill:\n")[0]))


def test_a_study_distills_one_variants_run_into_another(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`teacher: sft` makes the distill variant wait for the sft variant and distill its run; plan counts the teacher
    as the sft variant's base before that run exists; a second run of the study trains nothing."""
    from tunelab.study import load_study, plan_study, run_study

    study = tmp_path / "teach.yaml"
    study.write_text(
        f"name: teach\nbase: {EXAMPLES / 'quickstart.yaml'}\noutput: {tmp_path / 'runs'}\nvariants:\n"
        "  distill:\n    teacher: sft\n"
        f"    set: {{method: distill, data.train: {DATA}/distill_train.jsonl, data.eval: {DATA}/distill_eval.jsonl, "
        "distill.max_completion_length: 16, train.max_steps: 3}\n"
        "  sft:\n    set: {train.max_steps: 3}\n"
        "compare:\n  max_new_tokens: 8\n"
    )
    loaded = load_study(study)
    assert loaded.order == ["sft", "distill"]
    planned = {name: plan for name, plan, _ in plan_study(loaded)}
    sft = planned["sft"].scope
    assert planned["distill"].memory.teacher_bytes == (sft.total_params - sft.trainable_params) * 4
    outcomes, report = run_study(loaded, log=lambda *_: None)
    assert [(o.name, o.status) for o in outcomes] == [("sft", "trained"), ("distill", "trained")]
    runs = {o.name: Path(o.run_dir) for o in outcomes}
    assert read_manifest(runs["distill"]).teacher.id == str(runs["sft"])
    assert report is not None and report.is_file()
    again, _ = run_study(load_study(study), log=lambda *_: None)
    assert [(o.name, o.status) for o in again] == [("sft", "skipped"), ("distill", "skipped")]
    broken = tmp_path / "broken.yaml"
    broken.write_text(study.read_text().replace("teacher: sft", "teacher: sfft"))
    with pytest.raises(
        TunelabError, match="variants.distill.teacher: unknown variant 'sfft'; variants are distill, sft"
    ):
        load_study(broken)
