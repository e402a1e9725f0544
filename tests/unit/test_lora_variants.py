"""LoRA's variants on config-only models: DoRA, rank-stabilised scaling, and original modules trained beside the
adapter (scope.lora.open), with counts and memory checked against formulas from the published configs."""

import math
import re
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, write_experiment
from tests.unit.test_scope import build, llama_dims, lora_count, tiny_mixtral
from tunelab.config import LoraScope, Scope, load_experiment
from tunelab.errors import TunelabError
from tunelab.plan import make_plan
from tunelab.scopes import apply_scope

LLAMA = CONFIGS / "llama-3.1-8b-instruct"
GEMMA3 = CONFIGS / "gemma-3-4b-it"
LLAMA_PARAMS = 8_030_261_248


def qv_count() -> int:
    d = llama_dims()
    return lora_count([(d["h"], d["h"]), (d["h"], d["kv"])], 16, d["L"])


def test_dora_adds_one_trained_magnitude_per_output_feature() -> None:
    d = llama_dims()
    model, resolved = apply_scope(build(LLAMA), Scope(lora=LoraScope(targets="qv", dora=True)))
    assert resolved.trainable_params == qv_count() + d["L"] * (d["h"] + d["kv"])
    assert resolved.dora_features == d["L"] * (d["h"] + d["kv"])
    assert resolved.adapter == "r 16, alpha 32 (scale 2), DoRA"
    assert model.peft_config["default"].use_dora
    magnitudes = [n for n in resolved.trainable_names if ".lora_magnitude_vector." in n]
    assert len(magnitudes) == 2 * d["L"]


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    model, resolved = apply_scope(build(LLAMA), Scope(lora=LoraScope(targets="qv", r=64, alpha=16, rslora=True)))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / math.sqrt(64)) == 2.0
    assert resolved.adapter == "r 64, alpha 16 (scale 2), rsLoRA"
    _, plain = apply_scope(build(LLAMA), Scope(lora=LoraScope(targets="qv", r=64, alpha=16)))
    assert plain.adapter == "r 64, alpha 16 (scale 0.25)" and plain.trainable_params == resolved.trainable_params


def test_open_trains_the_final_norm_and_head_beside_the_adapter() -> None:
    d = llama_dims()
    scope = Scope(lora=LoraScope(targets="qv", open=["norm", "lm_head"]))
    model, resolved = apply_scope(build(LLAMA), scope)
    opened = d["V"] * d["h"] + d["h"]
    assert resolved.opened_modules == ["lm_head", "model.norm"]
    assert resolved.opened_params == opened
    assert resolved.trainable_params == qv_count() + opened
    # The frozen originals stay in the model beside their trained copies, as PEFT counts them.
    assert resolved.total_params == LLAMA_PARAMS + qv_count() + opened
    assert set(model.peft_config["default"].modules_to_save) == {"lm_head", "model.norm"}
    assert not resolved.embeddings_train  # the head trains, the embeddings do not: no backward below the adapter


def test_an_opened_head_tied_to_the_embeddings_stays_one_tensor() -> None:
    """Gemma 3 ties lm_head to the input embeddings: opening the head opens the one shared matrix (once), and the
    embeddings then need backward through every layer."""
    meta = build(GEMMA3)
    vocab, hidden = meta.get_input_embeddings().weight.shape
    model, resolved = apply_scope(meta, Scope(lora=LoraScope(targets="qv", layers="last-half", open=["lm_head"])))
    assert resolved.tied_embeddings and model.peft_config["default"].ensure_weight_tying
    assert resolved.opened_modules == ["lm_head", "model.language_model.embed_tokens"]
    assert resolved.opened_params == vocab * hidden
    base = model.get_base_model()
    head, embeddings = base.get_output_embeddings(), base.get_input_embeddings()
    assert head.modules_to_save["default"].weight is embeddings.modules_to_save["default"].weight
    assert resolved.embeddings_train


def test_dora_on_fused_experts_is_one_clear_error() -> None:
    with pytest.raises(TunelabError, match=r"scope.lora.dora: all-linear on MixtralForCausalLM reaches its fused"):
        apply_scope(tiny_mixtral(), Scope(lora=LoraScope(dora=True, dropout=0.0)))
    model, resolved = apply_scope(tiny_mixtral(), Scope(lora=LoraScope(dora=True, targets="attention")))
    assert resolved.dora_features == 4 * (64 + 32 + 32 + 64)  # q, k, v, o out features in each of 4 layers


def plan_of(tmp_path: Path, lora: str, dtype: str = "bfloat16", master: str = "float32"):
    exp = write_experiment(
        tmp_path,
        f"name: v\nmodel: {{id: {LLAMA}, dtype: {dtype}, device: cpu}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"
        f"scope: {{lora: {{targets: qv, {lora}}}}}\n"
        f"train: {{max_length: 512, gradient_checkpointing: off, master_weights: {master}}}\n",
    )
    return make_plan(load_experiment(exp))


def test_memory_counts_opened_copies_in_the_model_dtype_and_doras_kept_outputs(tmp_path: Path) -> None:
    d = llama_dims()
    plain = plan_of(tmp_path, "r: 16").memory
    opened = plan_of(tmp_path, "open: [norm, lm_head]").memory
    copies = d["V"] * d["h"] + d["h"]
    # The copies train in float32 (master weights), as the adapter does: 4 bytes each as weights and gradients, 8
    # for AdamW's two moments, beside their frozen bfloat16 originals.
    assert opened.master == "params"
    assert opened.weights_bytes - plain.weights_bytes == copies * 4
    assert opened.gradients_bytes - plain.gradients_bytes == copies * 4
    assert opened.optimizer_bytes - plain.optimizer_bytes == copies * 8
    # Trained in the model's dtype (train.master_weights: model), the copies take 2 bytes; the adapter stays float32.
    half = plan_of(tmp_path, "open: [norm, lm_head]", master="model")
    assert half.memory.weights_bytes - plain.weights_bytes == copies * 2
    assert half.memory.gradients_bytes - plain.gradients_bytes == copies * 2
    assert half.memory.optimizer_bytes - plain.optimizer_bytes == copies * 4
    assert any("update in bfloat16 itself" in w and "train.master_weights: float32" in w for w in half.warnings)
    assert opened.activations_bytes == plain.activations_bytes  # the embeddings stay frozen
    dora = plan_of(tmp_path, "dora: true").memory
    extra = d["L"] * (d["h"] + d["kv"])
    assert dora.gradients_bytes - plain.gradients_bytes == extra * 4
    assert dora.activations_bytes - plain.activations_bytes == dora.tokens_per_forward * extra * 2
    embeddings = plan_of(tmp_path, "layers: last-half, open: [embeddings]").memory
    assert embeddings.activation_layers == d["L"]  # backward reaches the embeddings below every layer


TEMPLATE_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_token_rows_train_in_the_embeddings_and_an_untied_head() -> None:
    """scope.lora.tokens: three rows of the input embeddings and the same three of Llama's untied lm_head, nothing
    else of either; on Gemma 3, whose head is the embedding matrix, the three rows once."""
    from transformers import AutoTokenizer

    from tunelab.builtin import materialise

    tokenizer = AutoTokenizer.from_pretrained(materialise("tiny-chat"))
    ids = tokenizer.convert_tokens_to_ids(TEMPLATE_TOKENS)
    d = llama_dims()
    scope = Scope(lora=LoraScope(targets="qv", tokens=TEMPLATE_TOKENS))
    model, resolved = apply_scope(build(LLAMA), scope, tokenizer)
    assert resolved.trainable_params == qv_count() + 2 * 3 * d["h"]
    assert resolved.trained_tokens == TEMPLATE_TOKENS and resolved.embeddings_train
    assert model.peft_config["default"].trainable_token_indices == {"model.embed_tokens": ids, "lm_head": ids}
    meta = build(GEMMA3)
    hidden = meta.get_input_embeddings().weight.shape[1]
    _, tied = apply_scope(meta, Scope(lora=LoraScope(targets="qv", layers=[0], tokens=TEMPLATE_TOKENS)), tokenizer)
    _, plain = apply_scope(build(GEMMA3), Scope(lora=LoraScope(targets="qv", layers=[0])))
    assert tied.trainable_params - plain.trainable_params == 3 * hidden


def test_tokens_that_are_not_one_vocabulary_entry_are_refused() -> None:
    from transformers import AutoTokenizer

    from tunelab.builtin import materialise

    tokenizer = AutoTokenizer.from_pretrained(materialise("tiny-chat"))
    with pytest.raises(TunelabError, match=r"scope.lora.tokens: 'eot' is not a token of this tokenizer"):
        apply_scope(build(LLAMA), Scope(lora=LoraScope(tokens=["<|eot_id|>", "eot"])), tokenizer)
    with pytest.raises(TunelabError, match=r"scope.lora.tokens: needs the model's tokenizer"):
        apply_scope(build(LLAMA), Scope(lora=LoraScope(tokens=["<|eot_id|>"])))
    with pytest.raises(ValueError, match=r"tokens trains rows that open: \[lm_head\] trains whole already"):
        LoraScope(tokens=["<|eot_id|>"], open=["lm_head"])


def test_opened_copies_on_a_quantized_base_are_float32(tmp_path: Path) -> None:
    """prepare_model_for_kbit_training casts lm_head to float32 on a 4-bit base, and its trained copy with it."""
    d = llama_dims()
    exp = write_experiment(
        tmp_path,
        f"name: q\nmodel: {{id: {LLAMA}, dtype: bfloat16, device: cpu, quantization: {{bits: 4}}}}\n"
        f"data: {{train: {DATA}/sft_train.jsonl}}\nscope: {{lora: {{targets: qv, open: [lm_head]}}}}\n",
    )
    plain = make_plan(load_experiment(exp, ["scope.lora.open=[]"])).memory
    opened = make_plan(load_experiment(exp)).memory
    head = d["V"] * d["h"]
    assert opened.gradients_bytes - plain.gradients_bytes == head * 4
    assert opened.weights_bytes - plain.weights_bytes == head * 4


def test_pissa_plans_from_the_config_alone_and_what_its_saved_form_cannot_carry_is_one_line(tmp_path: Path) -> None:
    """plan never decomposes a weight (the meta device has none): the counts are plain LoRA's, and the adapter line
    says how it will be saved. Settings that PEFT's conversion to plain LoRA would drop are refused before training."""
    plan = plan_of(tmp_path, "init: pissa_niter_16")
    assert plan.scope.adapter == "r 16, alpha 32 (scale 2), pissa_niter_16 init, saved as plain LoRA r 32"
    assert plan.scope.trainable_params == qv_count()
    assert not [w for w in plan.warnings if "full SVD" in w]
    full = plan_of(tmp_path, "init: pissa").warnings
    assert (
        "scope.lora.init: pissa runs a full SVD of each of the 64 adapted weights (up to 4096x4096) as the model loads, "
        "minutes on a GPU and far longer on a CPU; pissa_niter_16 (a fast SVD) takes seconds and trains about the same"
    ) in full
    assert plan_of(tmp_path, "init: gaussian").scope.adapter == "r 16, alpha 32 (scale 2), gaussian init"
    refused = {
        "init: corda": "scope.lora.init: 'corda' is not a LoRA init tunelab runs (it needs a pass over the data",
        "init: orthogonal, r: 7": "init: orthogonal splits the rank in two halves, and r is 7; use an even r",
        "init: pissa, dora: true": "cannot carry dora; use init: default with dora, or remove dora",
        "init: olora, open: [lm_head]": "cannot carry open; use init: default with open",
        "init: pissa, tokens: ['<|eot_id|>']": "cannot carry tokens",
        "init: pissa_niter_4, bias: all": "cannot carry bias: all",
    }
    for lora, said in refused.items():
        with pytest.raises(TunelabError, match=re.escape(said)) as e:
            plan_of(tmp_path, lora)
        assert "\n" not in str(e.value) and "exp.yaml:4: scope.lora" in str(e.value), str(e.value)
    exp = write_experiment(
        tmp_path,
        f"name: q\nmodel: {{id: {LLAMA}, quantization: {{bits: 4}}}}\ndata: {{train: {DATA}/sft_train.jsonl}}\n"
        "scope: {lora: {init: pissa}}\n",
    )
    with pytest.raises(TunelabError, match=r"scope.lora.init: pissa on a quantized base .* remove model.quantization"):
        load_experiment(exp)


def test_eva_plans_plain_lora_counts_and_is_refused_where_it_has_no_sft_batches_or_linear_inputs(
    tmp_path: Path,
) -> None:
    """EVA keeps rank r in every layer (no redistribution), so plan counts it from the config alone as plain LoRA. It
    reads SFT batches (a preference method's pairs are refused in one line), and the inputs of linear layers (LoRA on
    fused expert weights is refused)."""
    from tests.unit.test_moe_scopes import EXPERTS, gpt_oss, lora

    plan = plan_of(tmp_path, "init: eva")
    assert plan.scope.adapter == "r 16, alpha 32 (scale 2), eva init"
    assert plan.scope.trainable_params == qv_count()
    exp = write_experiment(
        tmp_path,
        f"name: d\nmodel: {LLAMA}\nmethod: dpo\ndata: {{train: {DATA}/dpo_train.jsonl}}\nscope: {{lora: {{init: eva}}}}\n",
    )
    with pytest.raises(TunelabError) as e:
        load_experiment(exp)
    assert str(e.value).endswith(
        "scope.lora.init: eva starts the adapter from the inputs its layers see on SFT batches, and dpo trains on "
        "batches of another kind; use init: eva in the SFT run and init_from that run, or use init: default"
    )
    with pytest.raises(TunelabError) as e:
        apply_scope(gpt_oss(), lora(targets="attention", parameters=EXPERTS, dropout=0.0, init="eva"))
    assert str(e.value) == (
        "scope.lora.init: scope.lora.parameters trains weights outside linear layers, and EVA starts only adapters on "
        "linear layers from their inputs; use init: default, or drop scope.lora.parameters"
    )


def test_loraplus_is_shown_on_the_adapter_line_and_refused_under_a_sharding_engine(tmp_path: Path) -> None:
    from tests.conftest import EXAMPLES

    plan = plan_of(tmp_path, "loraplus_ratio: 16")
    assert plan.scope.adapter == "r 16, alpha 32 (scale 2), LoRA+ (B at 16x the learning rate)"
    assert plan.scope.trainable_params == qv_count()  # the same tensors, other learning rates
    with pytest.raises(TunelabError, match=r"exp.yaml:4: scope.lora.loraplus_ratio: Input should be greater than"):
        plan_of(tmp_path, "loraplus_ratio: 0.5")
    fsdp = f"distributed.accelerate_config={EXAMPLES / 'accelerate' / 'fsdp.yaml'}"
    exp = load_experiment(tmp_path / "exp.yaml", ["scope.lora.loraplus_ratio=16", fsdp])
    with pytest.raises(TunelabError, match=r"scope.lora.loraplus_ratio: LoRA\+ builds its optimizer .* \(FSDP\)"):
        make_plan(exp)


def test_pissa_starts_a_conv1d_model_where_it_was_and_olora_is_refused_there() -> None:
    """GPT-2 stores its projections transposed (Conv1D). PEFT's PiSSA transposes them before the SVD; its OLoRA
    does not, so the start it takes out is not the one the adapter adds back."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=64)).eval()

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = gpt2()(ids).logits
        model, resolved = apply_scope(gpt2(), Scope(lora=LoraScope(targets="all-linear", init="pissa", r=4)))
        assert torch.allclose(model.eval()(ids).logits, want, atol=1e-5)
    assert resolved.target_modules == ["c_attn", "c_fc", "c_proj"]
    with pytest.raises(TunelabError, match=r"scope.lora.init: olora .* GPT2LMHeadModel stores c_attn transposed"):
        apply_scope(gpt2(), Scope(lora=LoraScope(targets="all-linear", init="olora", r=4)))
