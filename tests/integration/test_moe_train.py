"""Architectures past the Llama family through train, at small sizes with the built-in model's tokenizer: Qwen3-MoE,
whose experts Transformers 5 fuses into 3D weights that LoRA reaches through PEFT's target_parameters, and Falcon-H1,
a hybrid whose Mamba mixer cannot run padding-free rows here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, EXAMPLES
from tunelab.config import load_experiment
from tunelab.errors import ConfigError
from tunelab.export import export_run
from tunelab.plan import make_plan
from tunelab.scopes import load_trained
from tunelab.train import train

pytestmark = pytest.mark.slow


def tiny_folder(folder: Path, tokenizer_dir: Path, model_type: str, **sizes) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return tiny_folder(
        tmp_path_factory.mktemp("qwen3-moe"), tiny_model_dir, "qwen3_moe", moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip


def test_mlp_lora_trains_the_experts_and_the_merged_export_carries_them(moe_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    exp = load_experiment(
        EXAMPLES / "quickstart.yaml",
        [f"model.id={moe_dir}", f"output.dir={tmp_path}", "scope.lora.targets=mlp", "train.max_steps=4"],
    )
    plan = make_plan(exp)
    assert plan.scope.target_modules == ["experts", "gate"]
    m = train(exp).manifest
    assert m.status == "completed" and m.change_check.ok
    assert m.trainable_params == plan.scope.trainable_params
    merged = export_run(tmp_path / "quickstart", tmp_path / "merged", merge=True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    base, plain = AutoModelForCausalLM.from_pretrained(moe_dir), AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids).logits, load_trained(tmp_path / "quickstart")(ids).logits, atol=1e-5, rtol=0
        )
    before, after = base.state_dict(), plain.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in (
        "experts.down_proj", "experts.gate_up_proj", "gate.weight"
    )]  # fmt: skip


def test_the_router_load_balancing_loss_is_the_configs_unless_the_file_sets_its_weight(
    moe_dir: Path, tmp_path: Path, tiny_model_dir
) -> None:
    """TRL's trainers add an MoE model's load-balancing loss to the loss they train and evaluate on, weighted by its
    config's router_aux_loss_coef (Qwen3-MoE's 0.001): train.router_aux_loss sets that weight, and 0 turns it off.
    The eval loss before the first step is the base's, so what it adds is the weight times the base's balance loss."""
    base_eval, lines = {}, {}
    for weight in (None, 0.0, 1.0):
        sets = [f"model.id={moe_dir}", f"output.dir={tmp_path}", f"output.name=w{weight}", "train.max_steps=1"]
        exp = load_experiment(
            EXAMPLES / "quickstart.yaml", sets + ([f"train.router_aux_loss={weight}"] * (weight is not None))
        )
        lines[weight] = make_plan(exp).router_line
        base_eval[weight] = train(exp).manifest.base_eval_loss
    assert lines == {
        None: "router load-balancing loss x 0.001, added to the loss trained and evaluated on (the model config's "
        "router_aux_loss_coef; train.router_aux_loss: 0 turns it off)",
        0.0: "router load-balancing loss: off (train.router_aux_loss)",
        1.0: "router load-balancing loss x 1, added to the loss trained and evaluated on (train.router_aux_loss)",
    }
    balance = base_eval[1.0] - base_eval[0.0]  # the base's balance loss: about top-k (2) where routing is even
    assert 1.0 < balance < 4.0
    assert base_eval[None] - base_eval[0.0] == pytest.approx(0.001 * balance, rel=1e-2)
    for overrides, refusal in [
        ([f"model.id={tiny_model_dir}"], "train.router_aux_loss: Llama is no mixture of experts"),
        (["method=orpo", f"data.train={DATA / 'pref_train.jsonl'}", "data.eval=null"], "TRL's ORPO trainer takes no"),
    ]:
        exp = load_experiment(
            EXAMPLES / "quickstart.yaml", [f"model.id={moe_dir}", "train.router_aux_loss=0.1", *overrides]
        )
        with pytest.raises(ConfigError, match=refusal):
            make_plan(exp)


def test_an_moe_whose_balance_loss_trl_cannot_compute_trains_without_it(tmp_path: Path, tiny_model_dir) -> None:
    """TRL's fused loss (SFT, DPO, KTO, GRPO) reads the experts' count as the config's num_experts: Granite-MoE's
    config (Phi-3.5-MoE's, Llama 4's) names it num_local_experts, and with the balance loss on by default every
    method failed at its first step with an AttributeError. It trains without that loss, and plan says why; a weight
    set in the file is refused, and so is one for a model that computes no such loss (GLM-4.5's config declares
    none, a dense Doge has no router)."""
    granite = tiny_folder(
        tmp_path / "granite", tiny_model_dir, "granitemoe", num_local_experts=4, num_experts_per_tok=2
    )
    glm = tiny_folder(
        tmp_path / "glm", tiny_model_dir, "glm4_moe", moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
    )  # fmt: skip
    sets = [f"model.id={granite}", f"output.dir={tmp_path}", "train.max_steps=1", "scope.lora.targets=qkvo"]
    for example in ("quickstart", "dpo"):
        exp = load_experiment(EXAMPLES / f"{example}.yaml", sets)
        assert make_plan(exp).router_line == (
            "router load-balancing loss: off (the config's x 0.001 would fail at the first step: TRL's fused loss "
            "reads the experts' count as num_experts, which GraniteMoe's config does not name)"
        )
        m = train(exp).manifest
        assert m.status == "completed" and m.global_steps == 1 and m.change_check.ok
    # a dense Doge (SmallDoge's checkpoints) keeps a router's settings and has no router: TRL weighed the router
    # logits it never returns (IndexError at the first step)
    doge = tiny_folder(tmp_path / "doge", tiny_model_dir, "doge", is_moe=False)
    exp = load_experiment(EXAMPLES / "quickstart.yaml", [*sets[1:], f"model.id={doge}", "output.name=doge-sft"])
    assert make_plan(exp).router_line is None
    assert train(exp).manifest.status == "completed"
    for model, refusal in [
        (granite, "TRL's fused loss reads the experts' count as num_experts, which GraniteMoe's config does not name"),
        (glm, "Glm4Moe's config declares no router_aux_loss_coef, so Transformers computes no load-balancing loss"),
        (doge, "Doge is no mixture of experts with a load-balancing loss (its config has is_moe: false)"),
    ]:
        exp = load_experiment(EXAMPLES / "quickstart.yaml", [f"model.id={model}", "train.router_aux_loss=0.01"])
        with pytest.raises(ConfigError, match=re.escape(refusal)):
            make_plan(exp)


@pytest.mark.parametrize("example", ["quickstart", "dpo"])
def test_llama4_trains_and_its_merged_export_is_the_trained_model(example: str, tmp_path: Path, tiny_model_dir) -> None:
    """Llama4ForCausalLM names its backbone language_model (its prefix in the image-text checkpoints) and holds it as
    `model`: TRL's fused LM head ran the whole model for the hidden states, and every method failed at its first
    step. It trains all-linear (the router left out), and the merged export computes what the trained model does."""
    from transformers import AutoModelForCausalLM

    folder = tiny_folder(
        tmp_path / "llama4", tiny_model_dir, "llama4_text", intermediate_size_mlp=128, num_local_experts=4,
        num_experts_per_tok=1,
    )  # fmt: skip
    sets = [f"model.id={folder}", f"output.dir={tmp_path}", "train.max_steps=2", "scope.lora.targets=all-linear"]
    m = train(load_experiment(EXAMPLES / f"{example}.yaml", sets)).manifest
    assert m.status == "completed" and m.global_steps == 2 and m.change_check.ok
    assert "router" not in m.target_modules and "q_proj" in m.target_modules
    merged = export_run(tmp_path / example, tmp_path / "merged", merge=True)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(merged)(ids).logits,
            load_trained(tmp_path / example)(ids).logits,
            atol=1e-5,
            rtol=0,
        )


def test_a_model_that_cannot_run_packed_rows_trains_on_padded_batches(tmp_path: Path, tiny_model_dir) -> None:
    """Falcon-H1's Mamba mixer refuses a padding-free row without the causal_conv1d package: the check before
    training pads instead (it crashed at the first step), and refuses an explicit padding_free: on in one line."""
    from tunelab.errors import ConfigError

    folder = tiny_folder(tmp_path / "falcon-h1", tiny_model_dir, "falcon_h1")
    settings = [f"model.id={folder}", f"output.dir={tmp_path}", "train.max_steps=2", "data.eval.rows=8"]
    m = train(load_experiment(EXAMPLES / "quickstart.yaml", settings)).manifest
    assert m.status == "completed" and m.change_check.ok and m.final_eval_loss < m.base_eval_loss
    assert m.batching["padding_free"] is False
    with pytest.raises(ConfigError) as e:
        train(load_experiment(EXAMPLES / "quickstart.yaml", [*settings, "train.padding_free=on", "output.name=on"]))
    assert str(e.value).startswith(
        "train.padding_free: on, but FalconH1ForCausalLM cannot run examples concatenated in one row (`causal_conv1d_fn`"
    )


@pytest.mark.parametrize("scope", ["{partial: {last_blocks: 1}}", "full"])
def test_a_moe_run_resumes_to_the_uninterrupted_weights(moe_dir: Path, tmp_path: Path, scope: str) -> None:
    """Transformers 5 writes a checkpoint's experts one by one (the hub's layout) and the Trainer reloads a checkpoint
    without fusing them back (huggingface/transformers#48805), so a resumed run's experts would silently restart from
    the base's. tunelab's checkpoints keep the model's own layout."""
    from tests.conftest import resume_matches_straight

    resume_matches_straight("quickstart", tmp_path, "--set", f"model.id={moe_dir}", "--set", f"scope={scope}")


# MXFP4's values (OCP Microscaling, E2M1): a 4-bit code's magnitude, its top bit the sign.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_decoded(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weights MXFP4 codes stand for, read from the format's definition: two codes a byte (low nibble first),
    32 values a block sharing the scale 2^(byte - 127); rows are the checkpoint's output features."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # (..., groups, 32)
    values = torch.tensor(E2M1 + [-v for v in E2M1])[codes]
    values = values * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
    return values.flatten(-2).transpose(1, 2)  # (experts, inputs, outputs), as GptOssExperts holds them


def test_a_gpt_oss_checkpoint_stored_in_mxfp4_trains_on_its_decoded_weights(tmp_path: Path, tiny_model_dir) -> None:
    """openai/gpt-oss ships its experts in MXFP4 (config.json's quantization_config), which takes no gradient: the base
    loads them decoded into the run's dtype, as OpenAI's fine-tuning recipe does, whichever kernels are installed."""
    import json

    from safetensors.torch import load_file, save_file

    from tunelab.models import load_model

    folder = tiny_folder(tmp_path / "gpt-oss", tiny_model_dir, "gpt_oss", num_local_experts=4)
    weights, codes, generator = load_file(folder / "model.safetensors"), {}, torch.Generator().manual_seed(1)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = weights.pop(name).shape
        blocks = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=generator)
        scales = torch.randint(122, 128, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=generator)
        weights |= {f"{name}_blocks": blocks, f"{name}_scales": scales}
        codes[name] = mxfp4_decoded(blocks, scales)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    not_converted = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": not_converted}
    (folder / "config.json").write_text(json.dumps(config))

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    settings = [f"model.id={folder}", f"output.dir={tmp_path}", "train.max_steps=3", f"scope.lora.parameters={experts}"]
    exp = load_experiment(EXAMPLES / "quickstart.yaml", settings)
    loaded = load_model(exp.model, torch.float32, "cpu").state_dict()
    for name, decoded in codes.items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name].double(), decoded, atol=0, rtol=0)
    plan = make_plan(exp)
    m = train(exp).manifest
    assert m.status == "completed" and m.change_check.ok and m.final_eval_loss < m.base_eval_loss
    assert m.trainable_params == plan.scope.trainable_params
    assert m.quantization is None  # trained on the decoded weights, not on a quantized base
