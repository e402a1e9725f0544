"""Reward modelling on the built-in model: the base with a new score head learns to score the chosen answer of the
DPO example's pairs above the rejected one; what it trained is exactly the LoRA scope plus the head; the exported
folder scores as plain Transformers (and PEFT) load it; compare uses it to score every variant's replies; GRPO
trains with it as its reward; a resume after SIGKILL ends with the same weights; and what cannot work is refused in
one line."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from tests.chat_fixtures import FAMILIES, build
from tests.conftest import (
    DATA,
    EXAMPLES,
    fake_run,
    kept_rollouts,
    resume_matches_straight,
    run_cli,
    write_experiment,
)
from tunelab.compare import compare
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.models import run_fingerprint
from tunelab.plan import make_plan
from tunelab.reward_model import RewardModel
from tunelab.runs import read_manifest
from tunelab.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("reward")
    return train(load_experiment(EXAMPLES / "reward.yaml", [f"output.dir={out}"])).run_dir


@pytest.fixture(scope="module")
def published(reward_run: Path, tmp_path_factory) -> Path:
    """The reward run exported merged: a folder laid out as a published reward model's hub checkpoint."""
    out = tmp_path_factory.mktemp("published") / "pub"
    assert run_cli("export", str(reward_run), "--out", str(out), "--merge").returncode == 0
    return out


def _pairs() -> list[dict]:
    return [json.loads(line) for line in (DATA / "pref_eval.jsonl").open()]


def _plain_scores(model, tokenizer, chats: list[list[dict]]) -> list[float]:
    """Scores as a user of the exported folder computes them: the chat template, one conversation at a time."""
    out = []
    with torch.no_grad():
        for chat in chats:
            ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
            out.append(model(ids).logits[0, 0].item())
    return out


def _assert_scored_as_plain(c, model, tokenizer) -> None:
    """Each variant's reward in compare `c` is the mean of plain Transformers' scores of its replies to the prompts."""
    for v in c.variants:
        chats = [
            p.messages + [{"role": "assistant", "content": o}]
            for p, o in zip(c.prompts, c.outputs[v.name], strict=True)
        ]
        expected = statistics.fmean(_plain_scores(model, tokenizer, chats))
        assert v.numbers["reward"] == pytest.approx(expected, abs=2e-4)


def test_a_reward_model_learns_to_score_the_chosen_answer_higher(reward_run: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # What trains: the DPO example's LoRA scope (the same settings) plus the new score head (hidden_size x 1); the
    # model holds no lm_head (vocab x hidden) and PEFT keeps the head's original beside its trained copy.
    plan, dpo = make_plan(load_experiment(EXAMPLES / "reward.yaml")), make_plan(load_experiment(EXAMPLES / "dpo.yaml"))
    h, vocab = plan.model.hidden_size, plan.model.vocab_size
    assert plan.model.architecture == "LlamaForSequenceClassification" and not dpo.model.tied_embeddings
    assert plan.scope.trainable_params == dpo.scope.trainable_params + h
    assert plan.scope.total_params == dpo.scope.total_params - vocab * h + 2 * h
    assert "trained so the chosen one scores higher" in plan.method_line

    m = read_manifest(reward_run)
    assert m.status == "completed" and m.method == "reward" and m.change_check.ok
    assert m.preference_accuracy_before < 0.7 and m.preference_accuracy_after >= 0.95
    assert m.final_eval_loss < 0.2 * m.base_eval_loss
    shown = run_cli("show", str(reward_run))
    expected = f"preference accuracy {m.preference_accuracy_before:.3f} -> {m.preference_accuracy_after:.3f}"
    assert expected in shown.stdout

    # Exported merged, it is a plain AutoModelForSequenceClassification folder with the pad id it scored with, and
    # its accuracy on the held-out pairs, scored one conversation at a time, is the one the run recorded.
    for merge in (True, False):
        args = ["export", str(reward_run), "--out", str(tmp_path / f"x{merge}"), *(["--merge"] if merge else [])]
        assert run_cli(*args).returncode == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "xTrue").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "xTrue")
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id is not None
    pairs = _pairs()
    chosen = _plain_scores(merged, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = _plain_scores(merged, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) == m.preference_accuracy_after
    adapter = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "xFalse", num_labels=1).eval()
    assert _plain_scores(adapter, tokenizer, [p["prompt"] + p["chosen"] for p in pairs]) == pytest.approx(
        chosen, abs=1e-4
    )
    card = (tmp_path / "xTrue" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card
    # tunelab's own scorer (compare's judge, GRPO's reward) gives the same scores
    judge = RewardModel(reward_run)
    assert judge([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]) == pytest.approx(chosen, abs=1e-4)


def test_center_rewards_keeps_the_scores_near_zero(reward_run: Path, tmp_path: Path) -> None:
    """reward.center_rewards reaches TRL's loss: the squared mean score of each pair, penalised, holds the held-out
    scores near 0, where the run without it scores them far from 0."""
    exp = load_experiment(EXAMPLES / "reward.yaml", [f"output.dir={tmp_path}", "reward.center_rewards=1.0"])
    assert "the squared mean score of each pair penalised x 1 (centred scores)" in make_plan(exp).method_line
    centred = train(exp.model_copy(update={"train": exp.train.model_copy(update={"max_steps": 24})})).run_dir
    pairs = _pairs()
    prompts, answers = [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    square = {run: statistics.fmean(x * x for x in RewardModel(run)(prompts, answers)) for run in (reward_run, centred)}
    assert square[centred] < 0.01 * square[reward_run]


def test_compare_scores_every_variants_replies_with_the_reward_model(
    reward_run: Path, published: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sft = train(load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={tmp_path}", "train.max_steps=4"]))
    # the held-out pairs, every third with its answers swapped: pairs it should get wrong
    swapped = [
        p | {"chosen": p["rejected"], "rejected": p["chosen"]} if i % 3 == 0 else p for i, p in enumerate(_pairs())
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in swapped))
    c = compare([sft.run_dir, reward_run], prompts_file=DATA / "prompts.jsonl", max_new_tokens=16, pairs_file=pairs)
    assert [v.name for v in c.variants] == ["base", "quickstart"]  # the reward model judges; it is no variant
    assert f"by the reward model reward ({reward_run})" in c.settings["rewards"]
    model = AutoModelForSequenceClassification.from_pretrained(published).eval()
    tokenizer = AutoTokenizer.from_pretrained(published)
    _assert_scored_as_plain(c, model, tokenizer)
    # how far to trust it: the pairs it orders right, as plain Transformers scores them, said under the table
    chosen, rejected = (
        _plain_scores(model, tokenizer, [p["prompt"] + p[k] for p in swapped]) for k in ("chosen", "rejected")
    )
    right = sum(a > b for a, b in zip(chosen, rejected, strict=True))
    assert 0 < right < len(swapped) and c.settings["judge_pair_accuracy"] == round(right / len(swapped), 4)
    assert f"which orders {right} of the {len(swapped)} preference pairs right" in c.settings["rewards"]

    with pytest.raises(TunelabError, match="is a reward model, which scores replies and writes none; give the runs"):
        compare([reward_run])
    with pytest.raises(TunelabError, match="2 reward models given"):
        compare([sft.run_dir, reward_run, reward_run])
    refused = run_cli("eval", str(reward_run), "--tasks", "x")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"eval: {reward_run} is a reward model (method: reward)" in refused.stderr


def test_grpo_trains_with_a_reward_model_as_its_reward(
    reward_run: Path, published: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """examples/grpo-reward-model.yaml: the DPO pairs' questions as GRPO's prompts, the reward model as the reward:
    every sampled reply's reward is the reward model's score of it, as plain Transformers scores the exported model;
    plan counts the reward model's weights beside the policy; the manifest records its fingerprint; the held-out eval
    reward rises; compare scores each variant's greedy replies with it, as plain Transformers scores them.

    The eval reward is the mean over 192 replies sampled at temperature 1 (8 for each held-out question): it rose by
    0.54 to 4.2 over 8 seeds on an Intel CPU (with 4 replies a question it fell for the example's seed there, and rose
    on an AMD CPU, whose rounding draws another reward head). Compare's greedy replies are not asserted to beat the
    base's: GRPO optimises sampled replies, and the trained policy's greedy ones scored above the base's for 5 of those
    8 seeds."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    overrides = [f"output.dir={tmp_path}", f"grpo.rewards=[{reward_run}]"]
    exp = load_experiment(EXAMPLES / "grpo-reward-model.yaml", overrides)
    plan = make_plan(exp)
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    with torch.device("meta"):
        scorer = AutoModelForSequenceClassification.from_config(config)
    assert plan.memory.reward_models == "reward"
    assert plan.memory.reward_models_bytes == sum(p.numel() for p in scorer.parameters()) * 4  # float32
    m = train(exp).manifest
    assert m.status == "completed" and m.reward_hashes == {str(reward_run): f"run {run_fingerprint(reward_run)}"}
    assert m.final_eval_reward > m.base_eval_reward
    model = AutoModelForSequenceClassification.from_pretrained(published).eval()
    tokenizer = AutoTokenizer.from_pretrained(published)
    kept = kept_rollouts(tmp_path / "grpo-reward-model")
    assert {kind for kind, _ in kept} == {"train", "eval"}
    for rows in kept.values():
        chats = [list(r.prompt) + list(r.completion) for r in rows.itertuples()]
        assert list(rows.reward) == pytest.approx(_plain_scores(model, tokenizer, chats), abs=1e-3)
    c = compare([tmp_path / "grpo-reward-model"], max_new_tokens=16)
    assert f"grpo-reward-model's rewards ({reward_run}) on each variant's outputs" == c.settings["rewards"]
    assert [v.name for v in c.variants] == ["base", "grpo-reward-model"]
    _assert_scored_as_plain(c, model, tokenizer)
    assert c.outputs["grpo-reward-model"] != c.outputs["base"]


def test_a_published_reward_model_scores_and_rewards_as_the_run_it_was_exported_from(
    reward_run: Path, published: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """model:<folder> names a published reward model (here the run exported merged, as a hub checkpoint is laid
    out): compare's scores and a GRPO run against it are the run's own, up to the merge's rounding (the reward
    model loads on first use without moving the random state the policy samples from). A causal LM folder, or a
    classifier of two labels, is refused in one line."""
    spec = f"model:{published}"
    sft = train(load_experiment(EXAMPLES / "quickstart.yaml", [f"output.dir={tmp_path}", "train.max_steps=2"]))
    by_run, by_model = (
        compare([sft.run_dir, judge], prompts_file=DATA / "prompts.jsonl", max_new_tokens=8)
        for judge in (reward_run, Path(spec))
    )
    assert by_model.settings["rewards"].endswith(f"by the reward model {published}")
    for a, b in zip(by_run.variants, by_model.variants, strict=True):
        assert a.numbers["reward"] == pytest.approx(b.numbers["reward"], abs=1e-4)

    runs = {}
    for name, judge in (("by-run", str(reward_run)), ("by-model", spec)):
        sets = [f"output.dir={tmp_path}", f"output.name={name}", f"grpo.rewards=[{judge}]", "train.max_steps=4"]
        runs[name] = train(load_experiment(EXAMPLES / "grpo-reward-model.yaml", sets)).manifest
    assert runs["by-model"].reward_hashes[spec].startswith("model ")
    # the same numbers up to the merge's rounding (loading a run draws its new head's init: without the random state
    # kept, the first eval's replies were others, -1.22 against -0.95)
    for key in ("base_eval_reward", "final_eval_reward"):
        assert getattr(runs["by-run"], key) == pytest.approx(getattr(runs["by-model"], key), abs=1e-5)
    two = tmp_path / "two"
    shutil.copytree(published, two)
    config = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps(config | {"id2label": {"0": "a", "1": "b"}}))
    for folder, refusal in [
        (tiny_model_dir, "is not a reward model: its config.json names LlamaForCausalLM"),
        (two, "scores 2 labels; a reward model gives one score (num_labels 1)"),
    ]:
        sets = [f"output.dir={tmp_path}", f"grpo.rewards=[model:{folder}]"]
        with pytest.raises(TunelabError, match=refusal.replace("(", "\\(").replace(")", "\\)")):
            make_plan(load_experiment(EXAMPLES / "grpo-reward-model.yaml", sets))
    # a published reward model whose weights lack its score head is refused, not scored by a random one
    from safetensors.torch import load_file, save_file

    headless = shutil.copytree(published, tmp_path / "headless")
    tensors = load_file(headless / "model.safetensors")
    save_file({k: t for k, t in tensors.items() if not k.startswith("score.")}, headless / "model.safetensors")
    with pytest.raises(TunelabError, match="lack 1 tensor\\(s\\) its config.json asks for \\(score.weight\\)"):
        RewardModel(f"model:{headless}").load()


def test_a_published_reward_model_loads_quantized_beside_the_policy(
    reward_run: Path, published: Path, tmp_path: Path
) -> None:
    """grpo.reward_quantization loads the published reward models 4-bit through bitsandbytes: the decoder's linear
    layers packed, the score head not. plan counts the bytes the loaded model holds, the quantized model still orders
    the held-out pairs, GRPO trains against it, and compare scores the run's outputs with it quantized, as it
    trained (not with the unquantized model, whose scores differ); as compare's judge with --judge-quantization it
    scores, and orders the pairs, as the quantized model does."""
    from bitsandbytes.nn import Linear4bit

    from tunelab.config import Quantization

    spec, q = f"model:{published}", Quantization(bits=4)
    quantized, plain = RewardModel(spec, quantization=q), RewardModel(spec)
    model = quantized.load()[0]
    packed = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    layers = model.config.num_hidden_layers
    assert len(packed) == 7 * layers and not isinstance(model.score, Linear4bit)
    assert model.score.weight.dtype == torch.float32

    sets = [f"output.dir={tmp_path}", f"grpo.rewards=[{spec}]", "train.max_steps=4"]
    exp = load_experiment(EXAMPLES / "grpo-reward-model.yaml", [*sets, "grpo.reward_quantization={bits: 4}"])
    plan, unquantized = make_plan(exp), make_plan(load_experiment(EXAMPLES / "grpo-reward-model.yaml", sets))
    assert plan.memory.reward_models == f"pub, {q.describe()}"
    assert plan.memory.reward_models_bytes == pytest.approx(model.get_memory_footprint(), rel=0.02)
    assert plan.memory.reward_models_bytes < unquantized.memory.reward_models_bytes - 0.5 * 4 * sum(
        m.weight.numel() for name, m in model.named_modules() if name in packed
    )

    pairs = _pairs()
    chosen, rejected = (quantized([p["prompt"] for p in pairs], [p[k] for p in pairs]) for k in ("chosen", "rejected"))
    accuracy = statistics.fmean(c > r for c, r in zip(chosen, rejected, strict=True))
    assert accuracy >= 0.9

    m = train(exp).manifest
    assert m.status == "completed" and m.reward_hashes[spec].startswith("model ")
    c = compare([tmp_path / "grpo-reward-model"], max_new_tokens=16)
    asked = [p.messages for p in c.prompts]
    for v in c.variants:
        by_quantized = statistics.fmean(quantized(asked, c.outputs[v.name]))
        assert v.numbers["reward"] == pytest.approx(by_quantized, abs=1e-4)
        assert abs(statistics.fmean(plain(asked, c.outputs[v.name])) - by_quantized) > 1e-3
    # compare's judge loaded as GRPO loads it (--judge-quantization): the quantized model's scores and pair accuracy
    judged = compare(
        [tmp_path / "grpo-reward-model", Path(spec)], max_new_tokens=16, pairs_file=DATA / "pref_eval.jsonl",
        judge_quantization=q,
    )  # fmt: skip
    assert f"by the reward model {published} ({q.describe()}), which orders" in judged.settings["rewards"]
    assert judged.settings["judge_pair_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    for v in judged.variants:
        by_quantized = statistics.fmean(quantized([p.messages for p in judged.prompts], judged.outputs[v.name]))
        assert v.numbers["reward"] == pytest.approx(by_quantized, abs=1e-4)
    for judges, refusal in [
        ([], "--judge-quantization: no reward model is among the runs"),
        ([reward_run], f"--judge-quantization: {reward_run} is a reward run, which scores as it trained"),
    ]:
        with pytest.raises(TunelabError, match=refusal):
            compare([tmp_path / "grpo-reward-model", *judges], judge_quantization=q)
    three = run_cli("compare", str(tmp_path / "grpo-reward-model"), spec, "--judge-quantization", "3")
    assert three.returncode == 2 and three.stderr == "error: --judge-quantization: 3 bits; bitsandbytes loads 4 or 8\n"


def test_grpo_against_a_reward_model_resumes_after_sigkill_to_the_same_weights(
    reward_run: Path, tmp_path: Path
) -> None:
    resume_matches_straight("grpo-reward-model", tmp_path, "--set", f"grpo.rewards=[{reward_run}]")


def test_a_grpo_resume_after_its_reward_model_was_retrained_is_refused(reward_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    judge = shutil.copytree(reward_run, tmp_path / "rm")
    overrides = [f"output.dir={tmp_path}", f"grpo.rewards=[{judge}]", "train.max_steps=2"]
    exp = load_experiment(EXAMPLES / "grpo-reward-model.yaml", overrides)
    assert train(exp).manifest.status == "completed"
    manifest = json.loads((tmp_path / "grpo-reward-model" / "manifest.json").read_text())
    (tmp_path / "grpo-reward-model" / "manifest.json").write_text(json.dumps(manifest | {"status": "interrupted"}))
    weights = judge / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: t + 1 if i == 0 else t for i, (k, t) in enumerate(tensors.items())}, weights)  # retrained in place
    with pytest.raises(TunelabError, match=f"the reward functions changed \\({judge}\\)"):
        train(exp, resume=True)


def test_two_processes_count_each_held_out_pair_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """23 held-out pairs over 2 processes: the sampler repeats one to even out the ranks, and the pair accuracy
    before training (the same random head in both runs, from the seed) is the one process's, over 23 pairs."""
    (tmp_path / "eval.jsonl").write_text("".join((DATA / "pref_eval.jsonl").read_text().splitlines(True)[:23]))
    common = ["--set", f"output.dir={tmp_path}", "--set", f"data.eval={tmp_path / 'eval.jsonl'}"]
    for n in (1, 2):
        done = run_cli("train", str(EXAMPLES / "reward.yaml"), "--nproc", str(n), *common, "--set",
                       "train.max_steps=1", "--name", f"p{n}")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = (read_manifest(tmp_path / f"p{n}").preference_accuracy_before for n in (1, 2))
    assert one == two and round(one * 23) == one * 23


def test_a_study_trains_a_reward_model_then_grpo_against_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`reward_model: rm` makes the GRPO variant wait for the rm variant and score its replies with that run; plan
    says the reward model is still to come; a second run of the study trains nothing; a variant that is no reward
    model, or a variant that is not GRPO, is refused in one line."""
    from tunelab.study import load_study, plan_study, run_study

    study = tmp_path / "rlhf.yaml"
    study.write_text(
        f"name: rlhf\nbase: {EXAMPLES / 'reward.yaml'}\noutput: {tmp_path / 'runs'}\nvariants:\n"
        "  policy:\n    reward_model: rm\n"
        f"    set: {{method: grpo, data.train: {DATA}/pref_prompts_train.jsonl, "
        f"data.eval: {DATA}/pref_prompts_eval.jsonl, grpo.generations: 4, grpo.max_completion_length: 8, "
        "train.batch_size: 8, train.max_length: 128, train.max_steps: 2}\n"
        "  rm:\n    set: {train.max_steps: 4}\n"
        "compare:\n  max_new_tokens: 8\n"
    )
    loaded = load_study(study)
    assert loaded.order == ["rm", "policy"]
    planned = {name: plan for name, plan, _ in plan_study(loaded)}
    assert any("does not exist yet (a run of output.dir to come)" in w for w in planned["policy"].warnings)
    outcomes, report = run_study(loaded, log=lambda *_: None)
    assert [(o.name, o.status) for o in outcomes] == [("rm", "trained"), ("policy", "trained")]
    runs = {o.name: Path(o.run_dir) for o in outcomes}
    assert read_manifest(runs["policy"]).reward_hashes == {str(runs["rm"]): f"run {run_fingerprint(runs['rm'])}"}
    assert report is not None and report.is_file()  # the policy and the base, scored by the reward model
    again, _ = run_study(load_study(study), log=lambda *_: None)
    assert [(o.name, o.status) for o in again] == [("rm", "skipped"), ("policy", "skipped")]
    for old, new, refusal in [
        ("reward_model: rm", "reward_model: rmm", "variants.policy.reward_model: unknown variant"),  # fmt: skip
        (
            "set: {train.max_steps: 4}",
            "set: {train.max_steps: 4, method: dpo}",
            "variants.policy.reward_model: variant 'rm' trains method dpo, not a reward model",
        ),  # fmt: skip
        (
            "set: {method: grpo, ",
            "set: {",
            "variants.policy.reward_model: a reward model scores GRPO's replies; set method: grpo",
        ),  # fmt: skip
        (
            "grpo.max_completion_length: 8, ",
            "grpo.max_completion_length: 8, grpo.reward_quantization: {bits: 4}, ",
            "variants.policy.reward_model: variant 'rm' is a reward run, which scores as it trained",
        ),  # fmt: skip
    ]:
        broken = tmp_path / "broken.yaml"
        broken.write_text(study.read_text().replace(old, new))
        with pytest.raises(TunelabError, match=refusal.replace("(", "\\(")):
            load_study(broken)


def test_a_reward_model_resumes_after_sigkill_to_the_same_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    resume_matches_straight("reward", tmp_path)


@pytest.mark.parametrize("family", ["qwen2.5-instruct", "smollm2-instruct"])
def test_a_real_chat_template_scores_as_the_trainer_scored(family: str, tmp_path: Path) -> None:
    """Published templates (Qwen2.5's default system prompt; SmolLM2's pad token, which is its EOS and turn
    terminator): the scorer that compare and GRPO use tokenizes a pair's answer exactly as TRL's RewardTrainer
    did, so its held-out accuracy is the one the run recorded from the trainer's own batches."""
    from trl.data_utils import _tokenize

    folder = build(family, tmp_path / family)
    exp = load_experiment(
        EXAMPLES / "reward.yaml", [f"output.dir={tmp_path}", f"model.id={folder}", "train.max_steps=12"]
    )
    m = train(exp).manifest
    assert m.status == "completed" and m.change_check.ok
    judge = RewardModel(tmp_path / "reward")
    _, tokenizer, _, _ = judge.load()
    pairs = _pairs()
    for p in pairs[:4]:
        assert judge.encode(p["prompt"], p["chosen"]) == _tokenize(tokenizer, p["prompt"] + p["chosen"])["input_ids"]
    if FAMILIES[family]["pad"] == FAMILIES[family]["eos"]:
        assert tokenizer.pad_token == tokenizer.eos_token
    chosen = judge([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = judge([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) == m.preference_accuracy_after


def test_what_a_reward_model_cannot_do_is_refused_in_one_line(reward_run: Path, tmp_path: Path) -> None:
    def refused(text: str) -> str:
        with pytest.raises(TunelabError) as e:  # the experiment's own checks, or plan's
            make_plan(load_experiment(write_experiment(tmp_path, text)))
        assert "\n" not in str(e.value)
        return str(e.value)

    base = f"name: t\nmodel: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA}/pref_train.jsonl}}\n"
    assert "scope.lora.open: lm_head: a reward model has no lm_head" in refused(
        base + "method: reward\nscope: {lora: {open: [lm_head]}}\n"
    )
    assert "scope.partial.lm_head: a reward model has no lm_head" in refused(
        base + "method: reward\nscope: {partial: {last_blocks: 1, lm_head: true}}\n"
    )
    # a reward model does not continue a language model's adapter, nor the other way round: export it merged first
    sft = fake_run(tmp_path, "sft", method="sft", fingerprint="x")
    text = refused(base + f"method: reward\ninit_from: {sft}\n")
    assert "trained a language model (sft) and this experiment trains a reward model (reward)" in text
    assert "tunelab export" in text and "--merge" in text
    assert "trained a reward model (reward) and this experiment trains a language model (dpo)" in refused(
        base + f"method: dpo\ninit_from: {reward_run}\n"
    )
    prompts = f"name: t\nmodel: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA}/distill_train.jsonl}}\n"
    assert "is a reward model (method: reward), which scores replies and predicts no tokens" in refused(
        prompts + f"method: distill\ndistill: {{teacher: {reward_run}}}\n"
    )
    assert f"grpo.rewards[0]: run '{sft}' trained method sft, not a reward model" in refused(
        prompts + f"method: grpo\ngrpo: {{rewards: [{sft}], generations: 4}}\n"
    )
    quantized = "reward_quantization: {bits: 4}, generations: 4"
    assert (
        f"grpo.reward_quantization: the reward run '{reward_run}' (grpo.rewards[0]) scores as it trained; export it "
        f"with `tunelab export {reward_run} --out FOLDER --merge` and name model:FOLDER"
    ) in refused(prompts + f"method: grpo\ngrpo: {{rewards: [{reward_run}], {quantized}}}\n")
    assert "grpo.reward_quantization: no reward in grpo.rewards is a published reward model" in refused(
        prompts + f"method: grpo\ngrpo: {{rewards: [trl:think_format_reward], {quantized}}}\n"
    )
    failed = fake_run(tmp_path, "rm", method="reward", status="failed")
    assert (
        f"grpo.rewards[0]: the reward model '{failed}' failed, not completed; the same tunelab train command with "
        "--resume continues from its start (no checkpoint yet), or name another"
    ) in refused(prompts + f"method: grpo\ngrpo: {{rewards: [{failed}], generations: 4}}\n")
    # Mistral Small 3.x's image-text checkpoint has no sequence-classification class in Transformers
    from tests.conftest import CONFIGS

    mistral = CONFIGS / "mistral-small-3.2-24b-instruct"
    text = refused(f"name: t\nmodel: {{id: {mistral}}}\ntokenizer: {{id: builtin:tiny-chat}}\n"
                   f"data: {{train: {DATA}/pref_train.jsonl}}\nmethod: reward\n")  # fmt: skip
    assert "method reward puts a score head on the base model, and Transformers has none for a 'mistral3'" in text
