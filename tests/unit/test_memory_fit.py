"""`plan` warns when its memory estimate is above the device's memory, naming the largest part and what shrinks it."""

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import Memory, make_plan, memory_warning

GIB = 1 << 30


def memory(**parts: int) -> Memory:
    sizes = dict(weights=0, gradients=0, optimizer=0, activations=0, checkpointed=0, reference=0, teacher=0) | parts
    mem = Memory(
        dtype="bfloat16",
        tokens_per_forward=4096,
        activation_layers=32,
        weights_bytes=sizes["weights"],
        gradients_bytes=sizes["gradients"],
        optimizer_bytes=sizes["optimizer"],
        activations_bytes=sizes["activations"],
        activations_checkpointed_bytes=sizes["checkpointed"],
        gradient_checkpointing=False,
        device="cuda",
        device_bytes=80 * GIB,
        reference="copy" if sizes["reference"] else None,
        reference_bytes=sizes["reference"],
        processes=1,
        sharded=[],
        total_bytes=0,
        teacher="t" if sizes["teacher"] else None,
        teacher_bytes=sizes["teacher"],
    )
    total = mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes + mem.reference_bytes + mem.activations_bytes
    total += mem.teacher_bytes
    return replace(mem, total_bytes=total)


def test_an_estimate_within_the_device_says_nothing() -> None:
    assert memory_warning(memory(weights=40 * GIB, activations=40 * GIB), "sft") is None
    assert memory_warning(replace(memory(weights=200 * GIB), device_bytes=None), "sft") is None


def test_the_warning_gives_the_sizes_and_the_fix_for_the_largest_part() -> None:
    full = memory(weights=30 * GIB, gradients=30 * GIB, optimizer=60 * GIB, activations=10 * GIB)
    assert memory_warning(full, "sft") == (
        "memory: the estimate (130.0 GiB) is above cuda memory (80.0 GiB); its largest part is the optimizer state "
        "(60.0 GiB): train fewer parameters (scope.lora, or fewer scope.partial.last_blocks), or split over "
        "processes with FSDP or ZeRO (distributed.accelerate_config)"
    )
    # With float32 master weights, keeping the trained weights in the model's dtype is one more way to shrink it.
    master = replace(full, master="params")
    assert memory_warning(master, "sft").endswith(
        "(distributed.accelerate_config), or keep trained weights in the model's dtype (train.master_weights: "
        "model; loses small updates)"
    )


@pytest.mark.parametrize(
    ("changes", "fix"),
    [
        (dict(), "a 4-bit base under LoRA (model.quantization: {bits: 4}), or the weights split over processes"),
        (dict(dtype="float32"), "model.dtype: bfloat16 (half the bytes) where the device has it, or a 4-bit base"),
        (dict(quantized="4-bit nf4"), "a device with more memory, or the weights split over processes"),
    ],
)
def test_weights_too_big_for_the_device(changes: dict, fix: str) -> None:
    mem = replace(memory(weights=90 * GIB, activations=GIB), **changes)
    assert memory_warning(mem, "sft").split(": ", 2)[2].startswith(fix)


def test_activations_and_the_reference_model() -> None:
    acts = memory(weights=16 * GIB, activations=70 * GIB, checkpointed=9 * GIB)
    assert memory_warning(acts, "sft").endswith(
        "activations (70.0 GiB): lower train.max_length or train.micro_batch_size, or set "
        "train.gradient_checkpointing: on"
    )
    checkpointed = replace(acts, gradient_checkpointing=True, activations_checkpointed_bytes=70 * GIB)
    assert memory_warning(checkpointed, "sft").endswith("lower train.max_length or train.micro_batch_size")
    dpo = memory(weights=30 * GIB, reference=40 * GIB, activations=20 * GIB)
    assert memory_warning(dpo, "kto").endswith(
        "reference model (40.0 GiB): kto.reference: precomputed (log-probabilities computed once, no second model)"
    )


def test_per_process_figures_say_so() -> None:
    mem = replace(memory(weights=90 * GIB), processes=8, sharded=["optimizer"], device="cpu")
    assert memory_warning(mem, "sft").startswith(
        "memory: the estimate per process (90.0 GiB) is above this machine's memory (80.0 GiB)"
    )


def test_plan_warns_exactly_when_its_estimate_is_above_the_machine(tmp_path: Path) -> None:
    """Full fine-tuning of Llama-3.1-8B in float32 on this machine: weights, gradients and AdamW alone are 120 GiB."""
    exp = write_experiment(
        tmp_path,
        f"name: full\nmodel: {{id: {CONFIGS}/llama-3.1-8b-instruct, dtype: float32, device: cpu}}\n"
        f"data: {{train: {DATA}/sft_train.jsonl}}\nscope: full\n",
    )
    plan = make_plan(load_experiment(exp))
    said = [w for w in plan.warnings if w.startswith("memory:")]
    assert said == ([memory_warning(plan.memory, "sft")] if plan.memory.total_bytes > plan.memory.device_bytes else [])
    assert plan.memory.weights_bytes + plan.memory.gradients_bytes + plan.memory.optimizer_bytes == 16 * 8_030_261_248


def test_the_output_head_is_one_fused_tile_for_the_trainers_that_fuse_it(tmp_path: Path) -> None:
    """SFT, DPO and KTO score tokens through TRL's fused LM head, in tiles; ORPO holds the whole logits."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from tunelab.plan import FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB

    assert (FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)  # TRL's tile
    exp = write_experiment(
        tmp_path,
        f"name: h\nmodel: {{id: {CONFIGS}/llama-3.1-8b-instruct, dtype: bfloat16, device: cpu}}\n"
        f"data: {{train: {DATA}/pref_train.jsonl}}\nmethod: dpo\nscope: {{lora: {{targets: qv}}}}\n"
        "train: {batch_size: 2, max_length: 4096, gradient_checkpointing: off}\n",
    )
    dpo = make_plan(load_experiment(exp)).memory
    orpo = make_plan(load_experiment(exp, ["method=orpo"])).memory
    tokens, vocab = dpo.tokens_per_forward, 128_256
    assert tokens == orpo.tokens_per_forward == 2 * 2 * 4096  # chosen and rejected of two pairs
    assert orpo.activations_bytes - dpo.activations_bytes == tokens * vocab * (2 + 8) - 4096 * 32768 * 2


def test_optimizer_state_follows_the_optimizer_named_and_8bit_matches_bitsandbytes() -> None:
    """An 8-bit AdamW keeps a byte a moment and a float32 scale per block of 256: measured on bitsandbytes' own state
    after a step, for a weight the size of one of Llama-3.1-8B's k_proj rows blocks."""
    import bitsandbytes as bnb
    import torch

    from tunelab.plan import optimizer_state_bytes

    weight = torch.nn.Parameter(torch.randn(1024, 4096))
    optimizer = bnb.optim.AdamW8bit([weight])
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    held = sum(t.numel() * t.element_size() for t in optimizer.state[weight].values() if torch.is_tensor(t))
    planned = optimizer_state_bytes("adamw_bnb_8bit", weight.numel() * 4, weight.numel())
    assert abs(held - planned) <= 0.001 * held  # the two 256-entry quantization maps are all that is left out
    n = weight.numel()
    assert optimizer_state_bytes(None, 4 * n, n) == 8 * n  # AdamW: two float32 moments
    assert optimizer_state_bytes("paged_adamw_32bit", 2 * n, n) == 8 * n  # float32 state on a bfloat16 weight
    assert optimizer_state_bytes("sgd", 4 * n, n) == optimizer_state_bytes("adafactor", 4 * n, n) == 0
    assert optimizer_state_bytes("lion_32bit", 4 * n, n) == 4 * n  # one moment


@pytest.mark.parametrize(
    ("device", "dtype", "setting", "master"),
    [
        ("cuda", "bfloat16", "float32", "params"),
        ("cuda", "float16", "float32", "params"),
        ("mps", "bfloat16", "float32", "params"),  # a Mac's bfloat16 base: float32 copies under autocast
        ("mps", "float16", "float32", "params"),
        ("cpu", "bfloat16", "float32", "params"),
        ("cpu", "float16", "float32", "none"),  # no float16 autocast on a CPU
        ("mps", "float32", "float32", "none"),
        ("mps", "bfloat16", "model", "none"),
    ],
)
def test_where_the_trained_weights_keep_their_float32_copy(device: str, dtype: str, setting: str, master: str) -> None:
    from tunelab.config import TrainSettings
    from tunelab.methods.common import master_copy

    assert master_copy(TrainSettings(master_weights=setting), False, device, dtype, None) == master


def test_float16_weights_under_the_gradient_scaler_are_refused_before_anything_loads() -> None:
    from tunelab.methods.common import half_gradients_refusal

    refusal = half_gradients_refusal("cuda", "float16", "none", 1_397_788_672)
    assert refusal == (
        "train.master_weights: model trains 1,397,788,672 weights in float16 on cuda, whose gradient scaler refuses "
        "float16 gradients; set train.master_weights: float32, or model.dtype: bfloat16"
    )
    assert half_gradients_refusal("mps", "float16", "none", 10) is not None
    for device, dtype, master, trained in [
        ("cuda", "float16", "params", 10),  # float32 copies: float32 gradients
        ("cuda", "bfloat16", "none", 10),  # bfloat16 needs no scaler
        ("cpu", "float16", "none", 10),  # no autocast, no scaler
        ("cuda", "float16", "none", 0),  # LoRA alone: the adapter is float32
    ]:
        assert half_gradients_refusal(device, dtype, master, trained) is None


def test_a_distillation_teacher_is_counted_from_its_published_config(tmp_path: Path) -> None:
    """Llama-3.1-8B distilled from itself in bfloat16: the frozen teacher beside the student is its 8,030,261,248
    parameters at 2 bytes, and where the estimate is above the device the warning weighs it with the other parts."""
    llama = CONFIGS / "llama-3.1-8b-instruct"
    exp = write_experiment(
        tmp_path,
        f"name: d\nmodel: {{id: {llama}, dtype: bfloat16, device: cpu}}\n"
        f"data: {{train: {DATA}/distill_train.jsonl}}\nmethod: distill\ndistill: {{teacher: {llama}}}\n"
        "train: {max_length: 2048, batch_size: 4, grad_accumulation: 4}\n",
    )
    plan = make_plan(load_experiment(exp))
    assert plan.memory.teacher == "llama-3.1-8b-instruct" and plan.memory.teacher_bytes == 2 * 8_030_261_248
    parts = plan.memory.weights_bytes + plan.memory.gradients_bytes + plan.memory.optimizer_bytes
    m = plan.memory
    acts = m.activations_checkpointed_bytes if m.gradient_checkpointing else m.activations_bytes
    assert plan.memory.total_bytes == parts + plan.memory.teacher_bytes + max(acts, plan.memory.sampling_bytes)
    teacher_largest = memory(weights=GIB, teacher=90 * GIB, activations=GIB)
    assert "its largest part is the teacher model (90.0 GiB): a smaller teacher (distill.teacher)" in (
        memory_warning(teacher_largest, "distill")
    )
