"""GRPO on the built-in model: prompts and the user's reward functions (examples/rewards.py). It trains the planned
adapter for the planned steps, raises the mean reward of replies sampled for held-out prompts, resumes after SIGKILL
to the same weights, keeps the best evaluation by reward, and a reward that fails or a run whose rewards
changed is refused in one line."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    DATA,
    EXAMPLES,
    kept_rollouts,
    resume_matches_straight,
    run_cli,
    straight_and_killed,
    trained_tensors,
    write_experiment,
)
from tests.integration.test_trackers import tensorboard_scalars
from tunelab.compare import compare
from tunelab.config import load_experiment
from tunelab.errors import ConfigError, TunelabError
from tunelab.plan import make_plan
from tunelab.runs import read_manifest, read_metrics
from tunelab.train import train

pytestmark = pytest.mark.slow


def _example_rewards():
    spec = importlib.util.spec_from_file_location("example_rewards", EXAMPLES / "rewards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example_rewards = _example_rewards()


def test_grpo_trains_the_planned_steps_and_raises_the_held_out_reward(tmp_path: Path, tiny_model_dir) -> None:
    exp = load_experiment(EXAMPLES / "grpo.yaml", [f"output.dir={tmp_path}", "train.report_to=[tensorboard]"])
    plan = make_plan(exp)
    assert plan.memory.reference is None and plan.memory.sampling_bytes > 0
    assert "4 replies sampled per prompt (2 prompts a step)" in plan.method_line
    m = train(exp).manifest
    assert m.status == "completed" and m.method == "grpo" and m.change_check.ok
    assert m.trainable_params == plan.scope.trainable_params
    prompts = sum(1 for _ in (DATA / "grpo_train.jsonl").open())
    # an epoch samples 4 replies of every prompt, 8 replies a step
    assert m.global_steps == prompts * 4 // 8 * exp.train.epochs
    assert m.base_eval_loss is None and m.final_eval_loss is None  # GRPO's eval loss measures no reply
    assert m.final_eval_reward > m.base_eval_reward
    rewards = EXAMPLES / "rewards.py"
    digest = hashlib.sha256(rewards.read_bytes()).hexdigest()[:16]
    assert m.reward_hashes == {f"{rewards}:names_country": digest, f"{rewards}:names_capital": digest}
    assert (tmp_path / "grpo" / "rewards" / "rewards.py").read_bytes() == rewards.read_bytes()
    run_dir = tmp_path / "grpo"
    logged = [r for r in read_metrics(run_dir) if "reward" in r]
    assert logged and all({"rewards/names_country/mean", "rewards/names_capital/mean"} <= r.keys() for r in logged)
    shown = run_cli("show", str(run_dir))
    assert f"eval reward {m.base_eval_reward:.4f} -> {m.final_eval_reward:.4f}" in shown.stdout
    listed = run_cli("runs", str(tmp_path), "--json")
    assert [r["eval_reward"] for r in json.loads(listed.stdout)] == [m.final_eval_reward]
    # the tracker's summary and the model card give the reward, not GRPO's eval loss (its policy loss)
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert scalars["tunelab/final_eval_reward"] == pytest.approx([m.final_eval_reward], rel=1e-6)
    assert "tunelab/final_eval_loss" not in scalars
    exported = run_cli("export", str(run_dir), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"| eval reward | {m.base_eval_reward:.4g} | {m.final_eval_reward:.4g} |" in card

    # the replies sampled for each logged step and each evaluation are kept under what they are, with their rewards
    rollouts = kept_rollouts(run_dir)
    metrics = read_metrics(run_dir)
    assert sorted(k for k in rollouts if k[0] == "train") == [("train", r["step"]) for r in metrics if "reward" in r]
    assert sorted(k for k in rollouts if k[0] == "eval") == [("eval", r["step"]) for r in metrics if "eval_reward" in r]
    rows = {r["prompt"][-1]["content"]: (kind, r) for kind in ("train", "eval") for r in grpo_rows(kind)}
    for (kind, _), replies in rollouts.items():
        asked = [rows[p[-1]["content"]] for p in replies["prompt"]]
        assert {k for k, _ in asked} == {kind}
        # a step's generation batch; an evaluation's every reply, 4 to each held-out prompt (TRL logs its last batch)
        if kind == "train":
            assert len(replies) == 8
        else:
            counts = Counter(p[-1]["content"] for p in replies["prompt"])
            assert counts == {r["prompt"][-1]["content"]: 4 for r in grpo_rows("eval")}
        fields = {key: [r[key] for _, r in asked] for key in ("country", "capital")}
        completions = [list(c) for c in replies["completion"]]
        for name in ("names_country", "names_capital"):  # each reward as the example's function scores the reply
            assert list(replies[name]) == getattr(example_rewards, name)(completions, **fields)
    assert not (run_dir / "checkpoints" / "completions").exists()
    evaluations = sum(kind == "eval" for kind, _ in rollouts)
    assert f"replies sampled: {len(rollouts) - evaluations} logged steps and {evaluations} evaluations" in shown.stdout
    # show --replies prints the latest step's first replies with their rewards
    latest = max(k for k in rollouts if k[0] == "train")
    first = rollouts[latest].iloc[0]
    printed = run_cli("show", str(run_dir), "--replies", "2").stdout
    assert f"replies sampled at step {latest[1]} (2 of 8; " in printed
    assert f"[1] {first['prompt'][-1]['content']}\n    -> {first['completion'][0]['content'].strip()}" in printed
    scores = "  ".join(f"{k} {first[k]:.2f}" for k in ("names_country", "names_capital", "advantage"))
    assert f"\n    {scores}\n[2] " in printed

    # compare scores each variant's greedy replies to the held-out prompts with the run's rewards
    c = compare([run_dir], max_new_tokens=16)
    assert c.settings["rewards"] == "grpo's rewards (names_country, names_capital) on each variant's outputs"
    for v in c.variants:
        named = [
            (p.fields["country"] in out) + (p.fields["capital"] in out)
            for p, out in zip(c.prompts, c.outputs[v.name], strict=True)
        ]
        assert v.numbers["reward"] == round(sum(named) / len(named), 4)
    rewards = {v.name: v.numbers["reward"] for v in c.variants}
    assert rewards["grpo"] > rewards["base"]
    # prompts without the fields the rewards read: nothing scored, and the report says why
    other = compare([run_dir], prompts_file=DATA / "prompts.jsonl", max_new_tokens=4)
    assert all(v.numbers["reward"] is None for v in other.variants)
    assert other.settings["rewards"].startswith("not scored with grpo's rewards (names_country, names_capital): ")


def grpo_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"grpo_{split}.jsonl").read_text().splitlines()]


def test_grpo_resumes_after_sigkill_to_the_same_weights(tmp_path: Path, tiny_model_dir) -> None:
    """Sampling draws from the RNG the checkpoint restores: the resumed run samples the same replies, and ends with
    the uninterrupted run's weights and losses."""
    resume_matches_straight("grpo", tmp_path)
    assert [k for k in sorted(kept_rollouts(tmp_path / "crashed")) if k[0] == "train"] == [
        ("train", step) for step in range(1, 7)
    ]


def test_grpo_keeps_the_checkpoint_of_the_highest_eval_reward(tmp_path: Path, tiny_model_dir) -> None:
    exp = load_experiment(
        EXAMPLES / "grpo.yaml",
        [f"output.dir={tmp_path}", "train.keep=best", "train.eval_steps=16", "train.max_steps=64"],
    )
    m = train(exp).manifest
    evals = {r["step"]: r["eval_reward"] for r in read_metrics(tmp_path / "grpo") if "eval_reward" in r}
    trained = {step: reward for step, reward in evals.items() if step > 0}
    best = max(trained, key=lambda step: (trained[step], -step))  # the Trainer keeps the first of equal bests
    assert m.best_step == best and m.final_eval_reward == trained[best]
    # show and the checkpoints' views measure each step by its eval reward (GRPO's eval loss is the policy loss)
    run = tmp_path / "grpo"
    kept = sorted(int(p.name.removeprefix("checkpoint-")) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert best in kept and len(kept) == 2
    listed = ", ".join(f"{step} (eval reward {evals[step]:.4f})" for step in kept)
    assert f"checkpoints at steps {listed}; " in run_cli("show", str(run)).stdout
    for step in kept:
        view = json.loads(run_cli("show", str(run / "checkpoints" / f"checkpoint-{step}"), "--json").stdout)
        assert (view["name"], view["final_eval_reward"], view["final_eval_loss"]) == (f"grpo@{step}", evals[step], None)


def _grpo(tmp_path: Path, rewards: str, extra: str = "") -> Path:
    return write_experiment(
        tmp_path,
        f"name: g\nmodel: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA / 'grpo_train.jsonl'}}}\n"
        f"method: grpo\ngrpo: {{rewards: [{rewards}], generations: 2, max_completion_length: 8}}\n"
        f"train: {{batch_size: 4, max_length: 64, max_steps: 2}}\noutput: {{dir: {tmp_path / 'runs'}}}\n{extra}",
    )


def test_a_failing_reward_stops_the_run_in_one_line_naming_it(tmp_path: Path, tiny_model_dir) -> None:
    # the reward imports a helper beside it, as `python r.py` could
    (tmp_path / "helpers.py").write_text("def ratio(a, b):\n    return a / b\n")
    (tmp_path / "r.py").write_text(
        "from helpers import ratio\n\ndef broken(completions, **kw):\n    return [ratio(1, 0) for _ in completions]\n"
    )
    done = run_cli("train", str(_grpo(tmp_path, "r.py:broken")))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"grpo.rewards[0]: {tmp_path / 'r.py'}:broken raised ZeroDivisionError: division by zero" in done.stderr
    assert read_manifest(tmp_path / "runs" / "g").status == "failed"
    (tmp_path / "r.py").write_text("def short(completions, **kw):\n    return [1.0]\n")
    done = run_cli("train", str(_grpo(tmp_path, "r.py:short")), "--overwrite")
    assert "r.py:short returned 1 values for 4 completions; return one float" in done.stderr


def test_rewards_are_checked_before_anything_loads_and_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "r.py").write_text(f"open({str(marker)!r}, 'w')\n\ndef correct(completions, **kw):\n    return []\n")
    planned = run_cli("plan", str(_grpo(tmp_path, "r.py:corect")))
    assert planned.returncode == 2 and "Traceback" not in planned.stderr
    assert "grpo.rewards[0]: " in planned.stderr and "defines no function 'corect'; did you mean 'correct'?" in (
        planned.stderr
    )

    def refusal(rewards: str, *overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            make_plan(load_experiment(_grpo(tmp_path, rewards), list(overrides)))
        return str(e.value)

    assert "no file" in refusal("nope.py:f")
    assert "TRL has no reward 'format'" in refusal("trl:format")
    assert "leave less than grpo.max_completion_length=8 tokens" in refusal("r.py:correct", "train.max_length=24")
    assert not marker.exists()


def test_a_resume_with_changed_rewards_is_refused(tmp_path: Path, tiny_model_dir) -> None:
    (tmp_path / "r.py").write_text(
        "def length(completions, **kw):\n    return [len(str(c)) / 100 for c in completions]\n"
    )
    path = _grpo(tmp_path, "r.py:length")
    first = run_cli("train", str(path))
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads((tmp_path / "runs" / "g" / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    (tmp_path / "runs" / "g" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "r.py").write_text("def length(completions, **kw):\n    return [-len(str(c)) for c in completions]\n")
    resumed = run_cli("train", str(path), "--resume")
    assert resumed.returncode != 0 and "the reward functions changed" in resumed.stderr
    # compare scores with the copy the run kept, what it trained with, not the file as it is now
    (tmp_path / "runs" / "g" / "manifest.json").write_text(json.dumps(manifest | {"status": "completed"}))
    c = compare([tmp_path / "runs" / "g"], prompts_file=None, max_new_tokens=4, include_base=False)
    replies = [[{"role": "assistant", "content": out}] for out in c.outputs["g"]]
    assert c.variants[0].numbers["reward"] == round(sum(len(str(r)) / 100 for r in replies) / len(replies), 4)


# openai/gsm8k (main), its first two train rows as the hub holds them: the answer's last line is `#### <number>`.
GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How "
        "much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    },
]


def test_gsm8k_rows_reach_the_rewards_as_chats_with_their_answers(tmp_path: Path, tiny_model_dir) -> None:
    """The usual GRPO recipe's data: gsm8k's question renamed to the prompt and asked as a user turn (as_chat), the
    answer left for the reward to check; TRL's think_format_reward beside the user's own."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GSM8K * 4))
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "r.py").write_text(
        "import json\n\n"
        "def correct(prompts, completions, answer, **kwargs):\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(json.dumps({'prompts': prompts, 'answer': answer}) + '\\n')\n"
        "    return [float(c[0]['content'].strip().endswith(a.rpartition('#### ')[2])) for c, a in zip(completions, "
        "answer)]\n"
    )
    path = write_experiment(
        tmp_path,
        f"name: g\nmodel: {{id: builtin:tiny-chat}}\n"
        f"data: {{train: {data}, columns: {{question: prompt}}, as_chat: true}}\n"
        "method: grpo\ngrpo: {rewards: [r.py:correct, trl:think_format_reward], generations: 2, "
        "max_completion_length: 8}\n"
        f"train: {{batch_size: 4, max_length: 256, max_steps: 2, logging_steps: 1}}\noutput: {{dir: {tmp_path}}}\n",
    )
    m = train(load_experiment(path)).manifest
    assert m.status == "completed" and m.data.rendered == "chat"
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2  # one call a step, with the step's 4 completions (2 prompts x 2)
    for call in calls:
        question_of = {r["answer"]: r["question"] for r in GSM8K}
        asked = [p[-1]["content"] for p in call["prompts"]]
        assert len(call["answer"]) == 4 and set(call["answer"]) <= set(question_of)
        assert [p[-1]["role"] for p in call["prompts"]] == ["user"] * 4
        assert asked == [question_of[a] for a in call["answer"]]  # each completion's own row's answer
    logged = [r for r in read_metrics(tmp_path / "g") if "reward" in r]
    assert all("rewards/think_format_reward/mean" in r for r in logged)


def test_grpo_from_a_lora_run_keeps_that_adapter_as_its_kl_reference(tmp_path: Path, tiny_model_dir) -> None:
    """With grpo.beta > 0 and init_from a LoRA run, TRL's reference is a frozen copy of the adapter training starts
    from, not the base: the KL term of the first step, where the policy is that adapter, is exactly 0 (against the
    base it would not be, the first run having moved the adapter)."""
    (tmp_path / "r.py").write_text(
        "def length(completions, **kw):\n    return [len(str(c)) / 100 for c in completions]\n"
    )
    first = train(load_experiment(_grpo(tmp_path, "r.py:length"), ["train.learning_rate=1e-2"])).manifest
    assert first.change_check.ok
    overrides = [f"init_from={tmp_path / 'runs' / 'g'}", "grpo.beta=0.04", "train.max_steps=1", "train.logging_steps=1"]
    m = train(load_experiment(_grpo(tmp_path, "r.py:length"), [*overrides, "output.name=second"])).manifest
    assert m.reference == "adapter" and m.init_from == str(tmp_path / "runs" / "g")
    assert [r["kl"] for r in read_metrics(tmp_path / "runs" / "second") if "kl" in r] == [0.0]


def test_a_study_of_sft_then_grpo_compares_every_variant_on_rewards_and_eval_loss(
    tmp_path: Path, tiny_model_dir
) -> None:
    """SFT, then GRPO from it: compare asks every variant the GRPO run's held-out prompts, whose fields its rewards
    read, and measures the eval loss on the SFT run's chats."""
    from tunelab.study import load_study, run_study

    study = tmp_path / "rl.yaml"
    study.write_text(
        f"name: rl\nbase: {EXAMPLES / 'grpo.yaml'}\noutput: {tmp_path / 'runs'}\nvariants:\n"
        f"  sft:\n    set: {{method: sft, grpo: null, data.train: {DATA}/sft_train.jsonl, "
        f"data.eval: {DATA}/sft_eval.jsonl, train.max_steps: 4}}\n"
        "  grpo:\n    after: sft\n    set: {train.max_steps: 2}\n"
        "compare:\n  max_new_tokens: 8\n"
    )
    outcomes, report = run_study(load_study(study), log=lambda *_: None)
    assert [(o.name, o.status) for o in outcomes] == [("sft", "trained"), ("grpo", "trained")]
    result = json.loads((report.parent / "report.json").read_text())
    assert result["settings"]["rewards"].endswith("'s rewards (names_country, names_capital) on each variant's outputs")
    assert [p["fields"]["capital"] for p in result["prompts"][:2]] == [
        json.loads(line)["capital"] for line in (DATA / "grpo_eval.jsonl").read_text().splitlines()[:2]
    ]
    for v in result["variants"]:
        assert v["numbers"]["reward"] is not None and v["numbers"]["eval_loss"] is not None, v["name"]


def test_a_template_that_opens_a_think_block_for_generation_serves_grpo(tmp_path: Path, tiny_model_dir) -> None:
    """Reasoning models' templates (DeepSeek-R1's distills, MiniMax-M2, Nemotron-Nano-v2) end the generation prompt
    with '<think>\\n', which no written-out reply begins with: SFT cannot supervise a reply there and is refused, but
    GRPO samples right after it. Its prompts are measured as TRL renders them, and it trains."""
    import shutil

    from tunelab.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    opened = "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    assert opened in template
    template = template.replace("{%- generation %}\n", "").replace("{%- endgeneration %}\n", "")  # as such ship
    (model / "chat_template.jinja").write_text(template.replace(opened, opened[:-3] + " + '<think>\\n' }}"))

    def experiment(method: str, data: str) -> Path:
        return write_experiment(
            tmp_path,
            f"name: {method}\nmodel: {{id: {model}}}\ndata: {{train: {DATA / data}}}\nmethod: {method}\n"
            + (
                "grpo: {rewards: [trl:think_format_reward], generations: 2, max_completion_length: 8}\n"
                * (method == "grpo")
            )
            + f"train: {{batch_size: 4, max_length: 96, max_steps: 1}}\noutput: {{dir: {tmp_path / 'runs'}}}\n",
            name=f"{method}.yaml",
        )

    with pytest.raises(TunelabError, match="generation prompt goes on with '<think>"):
        make_plan(load_experiment(experiment("sft", "sft_train.jsonl")))
    exp = load_experiment(experiment("grpo", "grpo_train.jsonl"))
    plan = make_plan(exp)
    tokenizer = load_tokenizer(exp.tokenizer, exp.model)
    first = json.loads((DATA / "grpo_train.jsonl").read_text().splitlines()[0])["prompt"]
    rendered = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<think>\n")
    assert "".join(s["text"] for s in plan.to_json()["data"]["first_example"]) == rendered
    assert train(exp).manifest.status == "completed"


def test_two_iterations_checkpoint_between_sampled_batches_and_resume_to_the_same_weights(tmp_path: Path) -> None:
    """grpo.iterations: 2 trains two steps on each sampled batch, which TRL keeps in memory only: a checkpoint between
    them could not resume to the same run. A save_steps that falls there is refused in one line; timed checkpoints
    (a moment's worth of train.save_minutes: every step it may) fall after every second step, and a run killed after
    one resumes to the uninterrupted run's weights."""
    grpo = str(EXAMPLES / "grpo.yaml")
    refused = run_cli("plan", grpo, "--set", "grpo.iterations=2", "--set", "train.save_steps=3")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "train.save_steps: 3 puts checkpoints within the 2 steps that train on one sampled batch" in refused.stderr
    steps = ["--set", "train.max_steps=6", "--set", "train.save_minutes=1e-9", "--set", "train.save_total_limit=10"]
    steps += ["--set", "train.logging_steps=1", "--set", "grpo.iterations=2"]
    crashed, killed = straight_and_killed("grpo", 4, tmp_path, *steps)
    assert killed == -9
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "straight" / "checkpoints").glob("checkpoint-*"))
    assert saved == [2, 4, 6]
    resumed = run_cli(*crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-4" in resumed.stdout
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
