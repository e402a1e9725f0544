"""Quantized bases from the config alone: settings checked, counts unpacked, memory against a published figure."""

from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, fake_run, write_experiment
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan

GIB = 1 << 30
# Llama-3.1-8B: 32 blocks of q, o (4096x4096), k, v (1024x4096) and gate, up, down (14336x4096), from config.json.
LLAMA_8B_LINEAR = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
LLAMA_8B_TOTAL = 8_030_261_248


def llama_8b(tmp_path: Path, quantization: str, train: str = "batch_size: 1, max_length: 32") -> Path:
    return write_experiment(
        tmp_path,
        f"""\
name: q
model: {{id: {CONFIGS}/llama-3.1-8b-instruct, dtype: bfloat16, device: cpu{quantization}}}
data: {{train: {DATA}/sft_train.jsonl}}
scope: {{lora: {{r: 16, alpha: 32, targets: all-linear}}}}
train: {{{train}, gradient_checkpointing: "off"}}
""",
    )


def test_qlora_plan_for_llama_8b_matches_the_published_peak(tmp_path: Path) -> None:
    plan = make_plan(load_experiment(llama_8b(tmp_path, ", quantization: {bits: 4}")))
    plain = make_plan(load_experiment(llama_8b(tmp_path, "")))
    # Counts as the unquantized model has them.
    assert (plan.scope.trainable_params, plan.scope.total_params) == (
        plain.scope.trainable_params,
        plain.scope.total_params,
    )
    assert plan.scope.total_params == LLAMA_8B_TOTAL + plan.scope.trainable_params
    assert plan.memory.quantized_params == LLAMA_8B_LINEAR
    adapter = plan.scope.trainable_params
    nf4_double = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert plan.memory.weights_bytes == int(LLAMA_8B_LINEAR * nf4_double) + (LLAMA_8B_TOTAL - LLAMA_8B_LINEAR) * 4 + (
        adapter * 4
    )
    # PEFT + bitsandbytes QLoRA on Llama-3-8B at batch 1, length 32: "~8GiB" (docs/memory.md cites the source).
    assert abs(plan.memory.total_bytes - 8 * GIB) <= 0.15 * 8 * GIB
    assert plan.memory.total_bytes < 0.6 * plain.memory.total_bytes


def test_8bit_and_fp4_weights(tmp_path: Path) -> None:
    eight = make_plan(load_experiment(llama_8b(tmp_path, ", quantization: {bits: 8}")))
    kept = (LLAMA_8B_TOTAL - LLAMA_8B_LINEAR) * 4
    assert eight.memory.weights_bytes == LLAMA_8B_LINEAR + kept + eight.scope.trainable_params * 4
    single = make_plan(load_experiment(llama_8b(tmp_path, ", quantization: {bits: 4, double_quant: false}")))
    assert single.memory.weights_bytes - kept - single.scope.trainable_params * 4 == int(
        LLAMA_8B_LINEAR * (0.5 + 4 / 64)
    )
    assert eight.memory.quantized == "8-bit (LLM.int8)" and single.memory.quantized == "4-bit nf4"


@pytest.mark.parametrize("scope", ["partial: {last_blocks: 2}", "full: true"])
def test_a_quantized_base_trains_lora_only(scope: str, tmp_path: Path) -> None:
    path = write_experiment(
        tmp_path,
        f"name: q\nmodel: {{id: builtin:tiny-chat, quantization: {{bits: 4}}}}\n"
        f"data: {{train: {DATA}/sft_train.jsonl}}\nscope: {{{scope}}}\n",
    )
    with pytest.raises(TunelabError, match=r"model.quantization: a quantized base cannot train a (partial|full) scope"):
        load_experiment(path)


def test_quantization_settings_are_checked(tmp_path: Path) -> None:
    path = write_experiment(
        tmp_path, "name: q\nmodel: {id: builtin:tiny-chat, quantization: {bits: 3}}\ndata: {train: x}\n"
    )
    with pytest.raises(TunelabError, match=r"model.quantization.bits"):
        load_experiment(path)


def test_mps_is_refused_with_the_reason() -> None:
    from tunelab.config import Quantization
    from tunelab.models import check_quantization

    with pytest.raises(TunelabError, match=r"bitsandbytes has no complete Apple MPS backend"):
        check_quantization(Quantization(bits=4), "mps")
    check_quantization(Quantization(bits=4), "cpu")


def test_compare_refuses_differently_quantized_bases_before_loading(tmp_path: Path) -> None:
    from tunelab.compare import compare

    nf4 = {
        "bits": 4,
        "type": "nf4",
        "double_quant": True,
        "compute_dtype": "auto",
        "describe": "4-bit nf4 double-quant",
    }
    runs = [fake_run(tmp_path, "q", quantization=nf4), fake_run(tmp_path, "p", quantization=None)]
    with pytest.raises(
        TunelabError, match=r"differently quantized bases \(q: 4-bit nf4 double-quant, p: unquantized\)"
    ):
        compare(runs)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128},
            r"is stored quantized with gptq, which tunelab does not",
        ),
        ({"quant_method": "awq", "bits": 4}, r"is stored quantized with awq, which tunelab does not train on"),
        (
            {"quant_method": "bitsandbytes", "load_in_8bit": True},
            r"is stored in 8-bit \(LLM.int8\) by bitsandbytes.*add model.quantization: \{bits: 8\}",
        ),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
            r"stored in 4-bit fp4 by bitsandbytes.*\{bits: 4, type: fp4, double_quant: false\}",
        ),
        ({"quant_method": "mxfp4"}, None),  # gpt-oss: loads dequantized, plans as the model's dtype
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, None),
    ],
)
def test_a_checkpoint_stored_quantized_is_planned_as_it_will_load(tmp_path: Path, stored: dict, expected) -> None:
    import json

    folder = tmp_path / "model"
    folder.mkdir()
    config = json.loads((CONFIGS / "llama-3.1-8b-instruct" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": stored}))
    exp = load_experiment(llama_8b(tmp_path, ""), [f"model.id={folder}"])
    if expected is None:
        assert make_plan(exp).memory.quantized is None
        with pytest.raises(
            TunelabError, match=r"which loads decoded into the model's dtype and cannot be packed again"
        ):
            make_plan(load_experiment(llama_8b(tmp_path, ", quantization: {bits: 4}"), [f"model.id={folder}"]))
        return
    with pytest.raises(TunelabError, match=expected) as e:
        make_plan(exp)
    assert "\n" not in str(e.value)
