"""Scopes on architectures past the Llama family: fused MoE experts (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek-V3),
hybrid Mamba models (Nemotron-H, Mamba) and older final-norm names (OPT, GPT-NeoX). Models are built from
Transformers' own config classes for each model_type, at small sizes: the module names and shapes are the real ones."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import LoraScope, PartialScope, Scope
from tunelab.errors import ConfigError
from tunelab.models import meta_model
from tunelab.scopes import apply_scope

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip


def tiny(model_type: str, real: bool = False, **sizes):
    """A `model_type` model at small sizes: on the meta device (as plan builds it), or with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SMALL, **sizes})
    if not real:
        return meta_model(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def lora(**settings) -> Scope:
    return Scope(lora=LoraScope(**settings))


@pytest.mark.parametrize(("model_type", "experts"), [("mixtral", "num_local_experts"), ("qwen3_moe", "num_experts")])
def test_mlp_preset_reaches_the_fused_experts_that_all_linear_reaches(model_type: str, experts: str) -> None:
    """mlp is all-linear without attention: on a fused-expert model its only linear layers are attention's, and the
    preset matched nothing."""
    sizes = {experts: 4, "moe_intermediate_size": 32} if model_type == "qwen3_moe" else {experts: 4}
    _, everything = apply_scope(tiny(model_type, **sizes), lora(targets="all-linear"))
    _, attention = apply_scope(tiny(model_type, **sizes), lora(targets="attention"))
    _, mlp = apply_scope(tiny(model_type, **sizes), lora(targets="mlp"))
    assert attention.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert mlp.target_modules == ["experts", "gate"]  # the experts and the router, as all-linear has them
    assert mlp.trainable_params + attention.trainable_params == everything.trainable_params
    assert any("targets: mlp reaches the fused expert weights" in w for w in mlp.warnings)  # dropout gave way


def gpt_oss(real: bool = False):
    return tiny("gpt_oss", real, num_local_experts=4)


EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_all_linear_says_which_fused_experts_it_leaves_frozen_and_parameters_trains_them() -> None:
    """PEFT's all-linear does not reach gpt-oss's experts (3D parameters of a module that is not a linear layer):
    attention alone would train, silently."""
    _, plain = apply_scope(gpt_oss(), lora(targets="all-linear"))
    assert plain.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert plain.warnings == [
        "all-linear leaves GptOssForCausalLM's fused expert weights frozen (mlp.experts.down_proj, "
        "mlp.experts.gate_up_proj): they are not linear layers and PEFT's all-linear does not reach them here; set "
        "scope.lora.parameters: [mlp.experts.down_proj, mlp.experts.gate_up_proj] to train them with LoRA"
    ]
    model, resolved = apply_scope(gpt_oss(), lora(targets="all-linear", parameters=EXPERTS, layers="last-half", r=8))
    assert resolved.warnings == [
        "scope.lora.dropout is 0 here, not the default 0.05: PEFT trains scope.lora.parameters only without dropout"
    ]
    assert resolved.lora_modules == [f"model.layers.{i}.{m}" for i in (2, 3) for m in (
        "mlp.experts", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"
    )]  # fmt: skip
    # LoRA on an expert weight (E, a, b): one pair of r-rank matrices an expert, E * r * (a + b)
    shapes = {n: p.shape for n, p in gpt_oss().named_parameters()}
    experts = sum(
        s[0] * 8 * (s[1] + s[2]) for n, s in shapes.items() if n.endswith(tuple(EXPERTS)) and ".layers.0." in n
    )
    _, attention = apply_scope(gpt_oss(), lora(targets="attention", layers="last-half", r=8))
    assert resolved.trainable_params == attention.trainable_params + 2 * experts


def test_parameters_train_exactly_the_named_expert_weights_and_merge_into_them() -> None:
    base = gpt_oss(real=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, resolved = apply_scope(base, lora(targets="attention", parameters=EXPERTS, layers=[3], r=4))
    _, planned = apply_scope(gpt_oss(), lora(targets="attention", parameters=EXPERTS, layers=[3], r=4))
    assert planned.trainable_params == resolved.trainable_params == model.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-4, rtol=0)
    changed = sorted(k for k, v in merged.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == [f"model.layers.3.{n}" for n in (
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
        "self_attn.q_proj.weight", "self_attn.v_proj.weight",
    )]  # fmt: skip


def test_parameters_that_name_nothing_or_a_linear_layer_are_one_line_with_what_exists() -> None:
    for wrong in (["mlp.experts.up_proj"], ["self_attn.q_proj.weight"]):
        with pytest.raises(ConfigError) as e:
            apply_scope(gpt_oss(), lora(targets="attention", parameters=wrong))
        assert str(e.value) == (
            f"scope.lora.parameters: '{wrong[0]}' names no parameter outside a linear layer in the chosen layers; "
            "fused expert weights here: mlp.experts.down_proj, mlp.experts.gate_up_proj (linear layers go in "
            "scope.lora.targets)"
        )
    with pytest.raises(ConfigError, match=r"^scope.lora.dropout: scope.lora.parameters trains weights outside"):
        apply_scope(gpt_oss(), lora(targets="attention", parameters=EXPERTS, dropout=0.1))


def test_mlp_on_gpt_oss_matches_no_linear_layer_and_says_what_trains_its_experts() -> None:
    with pytest.raises(ConfigError) as e:
        apply_scope(gpt_oss(), lora(targets="mlp"))
    assert str(e.value).endswith(
        "; its fused expert weights train with scope.lora.parameters: [mlp.experts.down_proj, mlp.experts.gate_up_proj]"
    )


def test_linear_layers_peft_drops_for_routed_experts_are_named() -> None:
    """DeepSeek-V3's dense first layers and shared experts are linear gate/up/down projections, named as Mixtral's
    experts were in Transformers 4: PEFT 0.21's conversion of those names to the fused experts drops them
    (huggingface/peft#3711). What PEFT left without LoRA is said, not hidden."""
    model, resolved = apply_scope(
        tiny("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1),
        lora(targets="all-linear", dropout=0.0),
    )
    dense = [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    shared = [f"model.layers.1.mlp.shared_experts.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    dropped = [n for n in dense + shared if n not in resolved.lora_modules]
    assert "model.layers.1.mlp.experts" in resolved.lora_modules
    assert dropped == dense + shared  # PEFT 0.21.2; its fix makes this list empty, and the warning goes with it
    assert resolved.warnings == [
        "PEFT attached no LoRA to 6 of the linear modules the targets chose on DeepseekV3ForCausalLM "
        "(model.layers.0.mlp.down_proj, model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, ...): its "
        "conversion of Transformers 4 MoE names maps these names to the routed experts (huggingface/peft#3711); "
        "they stay frozen"
    ]


def test_presets_follow_block_classes_where_the_path_does_not_name_them() -> None:
    """Nemotron-H calls every block `mixer`: a NemotronHAttention in some layers, a NemotronHMOE or a Mamba mixer in
    others. And the model family's name in a class (Qwen3MoeAttention) does not make attention an MLP."""
    _, attention = apply_scope(tiny("nemotron_h"), lora(targets="attention"))
    assert attention.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    _, everything = apply_scope(tiny("nemotron_h"), lora(targets="all-linear"))
    assert "out_proj" not in everything.target_modules  # a Mamba mixer's, which PEFT refuses
    assert everything.warnings[0].startswith("all-linear leaves out out_proj on NemotronHForCausalLM")
    _, mlp = apply_scope(tiny("qwen3_moe", num_experts=4), lora(targets="mlp", dropout=0.0))
    assert not any(".self_attn." in n for n in mlp.lora_modules)


@pytest.mark.parametrize(("model_type", "norm"), [("opt", "model.decoder"), ("gpt_neox", "gpt_neox")])
def test_partial_finds_a_final_norm_named_final_layer_norm(model_type: str, norm: str) -> None:
    sizes = {"ffn_dim": 128, "word_embed_proj_dim": 64} if model_type == "opt" else {}
    _, resolved = apply_scope(tiny(model_type, **sizes), Scope(partial=PartialScope(norm=True)))
    assert resolved.trainable_names == [f"{norm}.final_layer_norm.weight", f"{norm}.final_layer_norm.bias"]


def test_compare_generates_an_expert_adapter_in_batches_of_its_own() -> None:
    """PEFT cannot route the rows of one batch to different adapters through LoRA on a fused expert weight."""
    from tunelab.scopes import get_scope

    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    experts = apply_scope(gpt_oss(real=True), lora(targets="attention", parameters=EXPERTS))[0].eval()
    assert not get_scope("lora").batches_with_base(experts, "default")
    with pytest.raises(ValueError, match="does not support mixed adapter batches"):
        experts(input_ids=ids, adapter_names=["default", "__base__"])
    attention = apply_scope(gpt_oss(real=True), lora(targets="attention"))[0].eval()
    assert get_scope("lora").batches_with_base(attention, "default")
    attention(input_ids=ids, adapter_names=["default", "__base__"])


def test_gpt_oss_20b_published_config_plans_exactly() -> None:
    """openai/gpt-oss-20b's config.json as published (its checkpoint stores the experts in MXFP4; plan counts
    parameters): 20.9B, as its model card says, and LoRA on attention and both expert weights counted to the
    parameter from the config's sizes."""
    import json

    from transformers import AutoConfig

    from tests.conftest import CONFIGS

    c = json.loads((CONFIGS / "gpt-oss-20b" / "config.json").read_text())
    h, v, n, e, i, d = (c[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers", "num_local_experts",
                                       "intermediate_size", "head_dim"))  # fmt: skip
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + c["num_attention_heads"]  # biases, sinks
    experts = e * (h * 2 * i + 2 * i) + e * (i * h + h) + (e * h + e)  # gate_up, down, router; with biases
    total = 2 * v * h + n * (attention + experts + 2 * h) + h
    _, resolved = apply_scope(
        meta_model(AutoConfig.from_pretrained(CONFIGS / "gpt-oss-20b")),
        lora(targets="all-linear", parameters=EXPERTS, r=8),
    )
    assert resolved.total_params - resolved.trainable_params == total
    assert round(total / 1e9, 1) == 20.9
    adapter = 8 * ((h + q) + 2 * (h + kv) + (q + h)) + e * 8 * ((h + 2 * i) + (i + h))
    assert resolved.trainable_params == n * adapter


def test_qwen3_30b_a3b_published_config_plans_exactly() -> None:
    """Qwen/Qwen3-30B-A3B's config.json as published (48 layers of 128 experts): 30.5B parameters, as its model
    card says. all-linear reaches attention, the router and both fused expert weights (PEFT converts the Transformers
    4 names it matched then); the fused gate_up weight carries rank 2r, the gate and up adapters it stands for."""
    import json

    from transformers import AutoConfig

    from tests.conftest import CONFIGS

    c = json.loads((CONFIGS / "qwen3-30b-a3b" / "config.json").read_text())
    h, v, n, e, i, d = (c[k] for k in ("hidden_size", "vocab_size", "num_hidden_layers", "num_experts",
                                       "moe_intermediate_size", "head_dim"))  # fmt: skip
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h + 2 * d  # q_norm and k_norm, one weight a head dimension
    experts = e * 3 * h * i + e * h  # gate_up and down, and the router
    total = 2 * v * h + n * (attention + experts + 2 * h) + h
    from tunelab.plan import planned_scope

    _, resolved = planned_scope(  # as plan applies it: the adapter's 0.5B parameters are shapes too
        meta_model(AutoConfig.from_pretrained(CONFIGS / "qwen3-30b-a3b")),
        lora(targets="all-linear", layers="last-half", dropout=0.0),
    )
    assert resolved.total_params - resolved.trainable_params == total == 30_532_122_624
    assert round(total / 1e9, 1) == 30.5
    assert resolved.target_modules == ["experts", "gate", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert resolved.layers == list(range(24, 48))
    r = 16
    adapter = r * ((h + q) + 2 * (h + kv) + (q + h)) + r * (h + e) + e * (2 * r * (h + 2 * i) + r * (i + h))
    assert resolved.trainable_params == 24 * adapter == 498_253_824


@pytest.mark.parametrize("top_k", [1, 2])
def test_presets_leave_out_a_router_that_returns_more_than_a_tensor(top_k: int) -> None:
    """Llama 4's router is an nn.Linear subclass whose forward returns scores and logits: LoRA on it (PEFT's own
    all-linear takes it) crashed the first forward pass. The probe that finds it ran the router on one token, which
    it could not pick 2 experts for: at top-k 2 all-linear kept the router, and training crashed."""
    sizes = dict(intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=top_k)
    model = tiny("llama4_text", real=True, **sizes)
    model, resolved = apply_scope(model, lora(targets="all-linear", dropout=0.0))
    assert "router" not in resolved.target_modules and "q_proj" in resolved.target_modules
    assert resolved.warnings[0].startswith("all-linear leaves out router on Llama4ForCausalLM: LoRA cannot go on them")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    _, planned = apply_scope(tiny("llama4_text", **sizes), lora(dropout=0.0))
    assert planned.trainable_params == resolved.trainable_params


def test_merged_expert_weights_count_in_the_activation_estimate_as_backward_keeps_them(tmp_path) -> None:
    """LoRA on a fused expert weight merges it with its update on every forward (PEFT's parametrization); backward
    keeps the merged copies. On gpt-oss-20b that is 19.1B elements: 35.6 GiB at bf16 beside 6.6 GiB of activations,
    one layer's worth under checkpointing. Measured on a small gpt-oss: the storage autograd keeps for backward grows by
    most of the merged weights' bytes, never by more."""
    from tests.conftest import CONFIGS, DATA, write_experiment
    from tunelab.config import load_experiment
    from tunelab.plan import make_plan

    body = (
        f"name: oss\nmodel: {{id: {CONFIGS / 'gpt-oss-20b'}, dtype: bfloat16}}\ndata: {{train: {DATA}/sft_train.jsonl}}"
        "\ntrain: {gradient_checkpointing: off}\nscope: {lora: {targets: attention, dropout: 0.0%s}}\n"
    )
    attention = make_plan(load_experiment(write_experiment(tmp_path, body % "", "a.yaml"))).memory
    plan = make_plan(load_experiment(write_experiment(tmp_path, body % f", parameters: {EXPERTS}", "e.yaml")))
    merged = 24 * 32 * (2880 * 2 * 2880 + 2880 * 2880)  # both expert weights of every layer, from the config
    assert (plan.scope.merged_params, plan.scope.merged_layers) == (merged, 24)
    assert plan.memory.activations_bytes - attention.activations_bytes == (merged + merged // 24) * 2
    assert plan.memory.activations_checkpointed_bytes - attention.activations_checkpointed_bytes == 2 * merged // 24 * 2

    def kept_for_backward(parameters: list[str]) -> int:
        model, resolved = apply_scope(gpt_oss(real=True), lora(targets="attention", parameters=parameters))
        storages = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(storages.values()), resolved.merged_params

    plain, _ = kept_for_backward([])
    with_experts, merged_small = kept_for_backward(EXPERTS)
    assert 0.5 * merged_small * 4 < with_experts - plain <= merged_small * 4  # float32 here
