"""A reward model planned on published configs: the score head in place of lm_head, counted exactly, beside the same
LoRA scope as the language model's; an image-text checkpoint's reward model trains its language model alone."""

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import make_plan


def _plan(tmp_path: Path, model: str, method: str, data: str):
    exp = write_experiment(
        tmp_path,
        f"name: p\nmodel: {{id: {CONFIGS / model}, dtype: bfloat16, device: cpu}}\n"
        f"tokenizer: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA}/{data}}}\nmethod: {method}\n"
        "scope: {lora: {r: 16, targets: all-linear}}\ntrain: {max_length: 2048, batch_size: 4}\n",
        name=f"{method}.yaml",
    )
    return make_plan(load_experiment(exp))


@pytest.mark.parametrize(
    ("model", "hidden", "vocab"),
    [("llama-3.1-8b-instruct", 4096, 128_256), ("phi-3-mini", 3072, 32_064), ("gemma-3-4b-it", 2560, 262_208)],
)
def test_a_reward_model_trains_the_language_models_lora_scope_and_a_score_head(
    tmp_path: Path, model: str, hidden: int, vocab: int
) -> None:
    sft, reward = _plan(tmp_path, model, "sft", "sft_train.jsonl"), _plan(tmp_path, model, "reward", "pref_train.jsonl")
    assert reward.model.architecture.endswith("ForSequenceClassification")
    assert reward.scope.trainable_params == sft.scope.trainable_params + hidden
    # no lm_head (vocab x hidden, or tied to the embeddings and so no parameter of its own), the head kept twice by
    # PEFT (its original beside the trained copy)
    lm_head = 0 if sft.model.tied_embeddings else vocab * hidden
    assert reward.scope.total_params == sft.scope.total_params - lm_head + 2 * hidden
    if model == "llama-3.1-8b-instruct":  # the mission's model: 8,030,261,248 parameters as published
        assert sft.scope.total_params - sft.scope.trainable_params == 8_030_261_248
        assert reward.scope.total_params - reward.scope.trainable_params == 8_030_261_248 - vocab * hidden + hidden


def test_a_published_8b_reward_model_is_planned_quantized_beside_the_policy(tmp_path: Path) -> None:
    """Llama-3.1-8B's published config as a one-label sequence classifier (the shape of Skywork-Reward-V2-Llama-3.1-8B)
    as GRPO's reward: bfloat16 it holds the published parameters less lm_head plus the score head, 2 bytes each;
    grpo.reward_quantization packs its decoder's linear weights, counted from the published dimensions."""
    import json

    from tunelab.config import Quantization
    from tunelab.plan import quantized_bytes_per_param

    config = json.loads((CONFIGS / "llama-3.1-8b-instruct" / "config.json").read_text())
    rm = tmp_path / "rm"
    rm.mkdir()
    scorer = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    (rm / "config.json").write_text(json.dumps(config | scorer | {"label2id": {"LABEL_0": 0}}))

    def row(quantization: str) -> tuple[str, int]:
        exp = write_experiment(
            tmp_path,
            f"name: p\nmodel: {{id: {CONFIGS / 'llama-3.1-8b-instruct'}, dtype: bfloat16, device: cpu}}\n"
            f"tokenizer: {{id: builtin:tiny-chat}}\ndata: {{train: {DATA}/pref_prompts_train.jsonl}}\nmethod: grpo\n"
            f"grpo: {{rewards: ['model:{rm}'], generations: 4{quantization}}}\ntrain: {{batch_size: 4}}\n",
        )
        memory = make_plan(load_experiment(exp)).memory
        return memory.reward_models, memory.reward_models_bytes

    h, inter, kv, layers = 4096, 14_336, 1024, 32
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o; k, v; gate, up, down
    assert row("") == ("rm", (8_030_261_248 - 128_256 * h + h) * 2)
    label, packed = row(", reward_quantization: {bits: 4}")
    four = Quantization(bits=4)
    assert label == f"rm, {four.describe()}"
    assert packed == (8_030_261_248 - 128_256 * h + h) * 2 - linear * 2 + int(linear * quantized_bytes_per_param(four))
    assert packed / 2**30 == pytest.approx(4.33, abs=0.01)  # README's 4.3 GiB, against 14.0
