"""The warning a run ends with when its tensor change check fails: one line, and for GRPO whose rewards never told
replies apart, why nothing trained."""

from tunelab.train import change_warning

CHECK = {
    "frozen_changed": [],
    "trainable_unchanged": ["lora_A.weight", "lora_B.weight"],
    "trainable_changed": 0,
    "frozen_unchanged": 21,
    "ok": False,
}


def test_grpo_rewards_that_never_differ_within_a_group_are_named_as_the_reason() -> None:
    flat = [{"frac_reward_zero_std": 1.0, "reward": 0.0}, {"frac_reward_zero_std": 1.0}, {"train_runtime": 3.0}]
    line = change_warning(CHECK, flat)
    assert line.startswith("tensor change check failed: 2 of 2 trained tensors did not change (lora_A.weight, ...)")
    assert "every group of replies scored alike at every step (frac_reward_zero_std 1)" in line and "\n" not in line
    # a step where some group's replies differed gave GRPO a signal: the reason is not that
    assert "scored alike" not in change_warning(CHECK, [*flat, {"frac_reward_zero_std": 0.5}])
    assert "scored alike" not in change_warning(CHECK, [{"loss": 1.0}])  # not GRPO


def test_frozen_tensors_that_changed_are_counted_and_named() -> None:
    check = CHECK | {"frozen_changed": ["model.norm.weight", "lm_head.weight"], "trainable_unchanged": []}
    assert change_warning(check, []) == "tensor change check failed: 2 frozen tensors changed (model.norm.weight, ...)"
