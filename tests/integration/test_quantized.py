"""LoRA on a bitsandbytes-quantized base (QLoRA 4-bit, 8-bit), on CPU: the same code path CUDA takes.

bitsandbytes >= 0.45 runs its 4-bit and 8-bit layers on CPU, so these tests train for real here.
"""

from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, resume_matches_straight, run_cli
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan
from tunelab.train import train

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

MERGE_ATOL = 1e-4  # float32 logits: the merged export against the quantized base + adapter (docs/quantization.md)


def experiment(tmp_path: Path, example: str = "qlora", *overrides: str):
    return load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={tmp_path}", *overrides])


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_learns_with_the_planned_counts(bits: int, tmp_path: Path, tiny_model_dir) -> None:
    from tunelab.models import load_model
    from tunelab.scopes import apply_scope

    exp = experiment(tmp_path, "qlora", f"model.quantization.bits={bits}", "train.max_steps=20")
    plan = make_plan(exp)
    # PEFT's own count on the loaded quantized model (it unpacks 4-bit weights) equals plan's from the config alone.
    model, _ = apply_scope(load_model(exp.model, torch.float32, "cpu"), exp.scope)
    trainable, total = model.get_nb_trainable_parameters()
    assert (plan.scope.trainable_params, plan.scope.total_params) == (trainable, total)
    linear = type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
    assert linear == {4: "Linear4bit", 8: "Linear8bitLt"}[bits]
    del model

    m = train(exp).manifest
    assert m.status == "completed" and m.change_check.ok
    assert m.final_eval_loss <= 0.7 * m.base_eval_loss
    assert (m.trainable_params, m.total_params) == (trainable, total)
    assert m.quantization.bits == bits and m.versions["bitsandbytes"]
    assert m.estimated_memory_bytes < make_plan(experiment(tmp_path, "quickstart")).memory.total_bytes


def test_merged_export_of_a_qlora_run_loads_in_plain_transformers(tmp_path: Path, tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.scopes import load_trained

    result = train(experiment(tmp_path, "qlora", "train.max_steps=6"))
    out = tmp_path / "merged"
    exported = run_cli("export", str(result.run_dir), "--out", str(out), "--merge")
    assert exported.returncode == 0, exported.stderr[-2000:]
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(plain.config, "quantization_config", None) is None
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 11, 64]])
    with torch.no_grad():
        merged, adapted = plain(ids).logits, load_trained(result.run_dir)(ids).logits
    torch.testing.assert_close(merged, adapted, atol=MERGE_ATOL, rtol=0)
    # The adapter changed the model: the merge carries it, not just the dequantized base.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert (base(ids).logits - merged).abs().max() > 100 * MERGE_ATOL


def test_dpo_on_a_4bit_base_raises_preference_accuracy(tmp_path: Path, tiny_model_dir) -> None:
    exp = experiment(tmp_path, "dpo", "model.quantization={bits: 4}", "train.max_steps=16")
    m = train(exp).manifest
    assert m.status == "completed" and m.reference == "adapter"
    assert m.preference_accuracy_after > m.preference_accuracy_before


def test_qlora_resumes_after_sigkill_to_the_same_adapter(tmp_path: Path, tiny_model_dir) -> None:
    resume_matches_straight("qlora", tmp_path)


def test_compare_refuses_quantized_beside_unquantized_unless_asked(tmp_path: Path, tiny_model_dir) -> None:
    quantized = train(experiment(tmp_path, "qlora", "train.max_steps=2", "output.name=q")).run_dir
    plain = train(experiment(tmp_path, "quickstart", "train.max_steps=2", "output.name=p")).run_dir
    refused = run_cli("compare", str(quantized), str(plain), "--out", str(tmp_path / "r"))
    assert refused.returncode != 0
    assert "differently quantized bases (q: 4-bit nf4 double-quant, p: unquantized)" in refused.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What do people in Beldu like to eat?"}\n')
    args = ["--prompts", str(prompts), "--max-new-tokens", "4", "--out", str(tmp_path / "r")]
    same = run_cli("compare", str(quantized), *args)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "on 4-bit nf4 double-quant" in (tmp_path / "r" / "report.md").read_text()
    mixed = run_cli("compare", str(quantized), str(plain), "--mixed-quantization", *args)
    assert mixed.returncode == 0, mixed.stderr[-2000:]


def test_a_checkpoint_stored_in_4_bits_trains_as_the_same_base_quantized_as_it_loads(
    tmp_path: Path, tiny_model_dir
) -> None:
    """A bitsandbytes checkpoint (as unsloth's *-bnb-4bit bases are published) holds packed weights: it trains as a
    quantized base, so model.quantization must say so, and then it trains exactly as the unquantized checkpoint
    quantized while it loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tunelab.errors import ConfigError
    from tunelab.starter import write_starter

    stored = tmp_path / "tiny-bnb-4bit"
    packing = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,  # as unsloth's are saved; the run computes in its own dtype
    )
    AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=packing, device_map={"": "cpu"}
    ).save_pretrained(stored)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(stored)

    unsaid = run_cli("plan", str(EXAMPLES / "quickstart.yaml"), "--set", f"model.id={stored}")
    assert unsaid.returncode == 2 and unsaid.stderr.count("\n") == 1, unsaid.stderr
    assert "is stored in 4-bit nf4 double-quant by bitsandbytes" in unsaid.stderr
    assert "add model.quantization: {bits: 4, type: nf4, double_quant: true}" in unsaid.stderr
    with pytest.raises(
        ConfigError, match=r"is stored in 4-bit nf4 double-quant, and its weights load as stored, not as 8-bit"
    ):
        make_plan(experiment(tmp_path, "qlora", f"model.id={stored}", "model.quantization.bits=8"))

    # tunelab init writes the line itself, and refuses a scope that opens original weights.
    data = str(EXAMPLES / "data" / "sft_train.jsonl")
    starter = write_starter(tmp_path / "first.yaml", str(stored), data, None, "qv", None, None)
    assert starter.exp.model.quantization.model_dump() == {
        "bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "auto"
    }  # fmt: skip
    with pytest.raises(TunelabError, match=r"--scope: .* is stored quantized by bitsandbytes"):
        write_starter(tmp_path / "partial.yaml", str(stored), data, None, "partial-last4", None, None)

    steps = ["train.max_steps=4"]
    packed = train(experiment(tmp_path, "qlora", f"model.id={stored}", "output.name=stored", *steps)).manifest
    on_load = train(experiment(tmp_path, "qlora", "output.name=on-load", *steps)).manifest
    assert packed.status == "completed" and packed.change_check.ok
    assert packed.quantization.describe == on_load.quantization.describe == "4-bit nf4 double-quant"
    assert packed.final_eval_loss == on_load.final_eval_loss < packed.base_eval_loss
    adapters = [load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("stored", "on-load")]
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key
