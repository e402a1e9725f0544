"""Scope resolution on config-only models (meta device), checked against formulas and against PEFT itself."""

import json
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tunelab.config import LoraScope, PartialScope, Scope
from tunelab.errors import TunelabError
from tunelab.models import meta_model
from tunelab.scopes import apply_scope

LLAMA = CONFIGS / "llama-3.1-8b-instruct"
PHI3 = CONFIGS / "phi-3-mini"


def build(folder: Path):
    from transformers import AutoConfig

    return meta_model(AutoConfig.from_pretrained(folder))


def llama_dims() -> dict:
    c = json.loads((LLAMA / "config.json").read_text())
    head = c["hidden_size"] // c["num_attention_heads"]
    return {
        "h": c["hidden_size"],
        "kv": head * c["num_key_value_heads"],
        "i": c["intermediate_size"],
        "L": c["num_hidden_layers"],
        "V": c["vocab_size"],
    }


def lora_count(shapes: list[tuple[int, int]], r: int, layers: int) -> int:
    return layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


def seed_variants() -> dict:
    d = llama_dims()
    h, kv, i, L = d["h"], d["kv"], d["i"], d["L"]
    q, k, v, o = (h, h), (h, kv), (h, kv), (h, h)
    mlp = [(h, i), (h, i), (i, h)]
    return {
        "qv": (LoraScope(targets="qv"), lora_count([q, v], 16, L), list(range(L))),
        "qkvo": (LoraScope(targets="qkvo"), lora_count([q, k, v, o], 16, L), list(range(L))),
        "all-linear": (LoraScope(targets="all-linear"), lora_count([q, k, v, o, *mlp], 16, L), list(range(L))),
        "last-half": (
            LoraScope(targets="all-linear", layers="last-half"),
            lora_count([q, k, v, o, *mlp], 16, L // 2),
            list(range(L // 2, L)),
        ),
    }


def test_llama_8b_total_is_the_published_count() -> None:
    _, resolved = apply_scope(build(LLAMA), Scope(full=True))
    assert resolved.total_params == resolved.trainable_params == 8_030_261_248


@pytest.mark.parametrize("variant", ["qv", "qkvo", "all-linear", "last-half"])
def test_seed_lora_variants_on_llama_8b(variant: str) -> None:
    from peft import LoraConfig, get_peft_model

    scope, expected, layers = seed_variants()[variant]
    _, resolved = apply_scope(build(LLAMA), Scope(lora=scope))
    assert resolved.trainable_params == expected
    assert resolved.layers == layers
    # The way the seed's train_lora.py writes it, straight into PEFT.
    modules = {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]}.get(
        variant, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    half = variant == "last-half"
    peft_model = get_peft_model(
        build(LLAMA),
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=modules,
            task_type="CAUSAL_LM",
            layers_to_transform=layers if half else None,
            layers_pattern="layers" if half else None,
        ),
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert (resolved.trainable_params, resolved.total_params) == (trainable, total)
    assert resolved.target_modules == sorted(modules)
    assert "lm_head" not in " ".join(resolved.lora_modules)


def test_seed_partial_last4_norm_lm_head_on_llama_8b() -> None:
    d = llama_dims()
    h, kv, i, V = d["h"], d["kv"], d["i"], d["V"]
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    model, resolved = apply_scope(build(LLAMA), Scope(partial=PartialScope(last_blocks=4, norm=True, lm_head=True)))
    assert resolved.trainable_params == 4 * per_block + h + V * h == 1_397_788_672
    # the same as the seed script's requires_grad loop
    reference = build(LLAMA)
    for p in reference.parameters():
        p.requires_grad_(False)
    for module in [*reference.model.layers[-4:], reference.model.norm, reference.lm_head]:
        for p in module.parameters():
            p.requires_grad_(True)
    assert resolved.trainable_names == [n for n, p in reference.named_parameters() if p.requires_grad]
    assert resolved.layers == [28, 29, 30, 31]


def test_phi3_fused_projections_refuse_qv_and_list_what_exists() -> None:
    with pytest.raises(TunelabError) as e:
        apply_scope(build(PHI3), Scope(lora=LoraScope(targets="qv")))
    assert str(e.value) == (
        "scope.lora.targets: preset 'qv' (q_proj, v_proj): q_proj, v_proj not found; "
        "linear modules in Phi3ForCausalLM: down_proj, gate_up_proj, o_proj, qkv_proj (targets: attention gives "
        "this model's attention projections: o_proj, qkv_proj)"
    )


def test_phi3_all_linear_is_four_modules_and_attention_preset_resolves() -> None:
    _, resolved = apply_scope(build(PHI3), Scope(lora=LoraScope(targets="all-linear")))
    assert resolved.target_modules == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    _, attn = apply_scope(build(PHI3), Scope(lora=LoraScope(targets="attention")))
    assert attn.target_modules == ["o_proj", "qkv_proj"]
    _, mlp = apply_scope(build(LLAMA), Scope(lora=LoraScope(targets="mlp")))
    assert mlp.target_modules == ["down_proj", "gate_proj", "up_proj"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ("first-half", list(range(16))),
        ({"last": 4}, [28, 29, 30, 31]),
        ({"first": 2}, [0, 1]),
        ([0, "5-7", 31], [0, 5, 6, 7, 31]),
    ],
)
def test_layer_selections(layers, expected) -> None:
    _, resolved = apply_scope(build(LLAMA), Scope(lora=LoraScope(targets="qv", layers=layers)))
    assert resolved.layers == expected
    assert len(resolved.lora_modules) == 2 * len(expected)


def test_regex_targets_with_layers() -> None:
    scope = LoraScope(targets=r".*self_attn\.(q|v)_proj", layers={"last": 2})
    _, resolved = apply_scope(build(LLAMA), Scope(lora=scope))
    assert resolved.lora_modules == [f"model.layers.{i}.self_attn.{m}" for i in (30, 31) for m in ("q_proj", "v_proj")]


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (LoraScope(targets="qv", layers=[0, 40]), "scope.lora.layers: layer 40 is out of range; this model has 32"),
        (LoraScope(targets="qv", layers={"last": 33}), "scope.lora.layers: asks for 33 layers but this model has 32"),
        (LoraScope(targets=["q_proj", "qkv"]), "scope.lora.targets: targets: qkv not found; linear modules in"),
        (LoraScope(targets="nothing.*"), "scope.lora.targets: regex 'nothing.*' matches no linear module"),
        (LoraScope(layers_pattern="blocks"), "scope.lora.layers_pattern: no list of decoder layers named 'blocks'"),
    ],
)
def test_bad_lora_scopes(scope: LoraScope, expected: str) -> None:
    with pytest.raises(TunelabError) as e:
        apply_scope(build(LLAMA), Scope(lora=scope))
    assert str(e.value).startswith(expected)


def test_partial_pattern_that_matches_nothing() -> None:
    with pytest.raises(TunelabError, match="scope.partial.patterns: 'nope' matches no parameter name"):
        apply_scope(build(LLAMA), Scope(partial=PartialScope(patterns=["nope"])))


def test_tied_lm_head_opens_embeddings_and_warns() -> None:
    model, resolved = apply_scope(tiny_llama(tied=True), Scope(partial=PartialScope(lm_head=True)))
    assert resolved.tied_embeddings
    assert resolved.trainable_names == ["model.embed_tokens.weight"]
    assert resolved.trainable_params == 100 * 64
    assert any("tied to the input embeddings" in w for w in resolved.warnings)


def tiny_mixtral():
    from transformers import AutoConfig

    return meta_model(
        AutoConfig.for_model(
            "mixtral",
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )


def test_all_linear_reaches_fused_moe_experts_as_peft_does() -> None:
    """Transformers 5 fuses Mixtral's experts into 3D parameters; PEFT's all-linear still trains them."""
    from peft import LoraConfig, get_peft_model

    _, resolved = apply_scope(tiny_mixtral(), Scope(lora=LoraScope(r=8, alpha=16, dropout=0.0)))
    peft_model = get_peft_model(
        tiny_mixtral(), LoraConfig(target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0)
    )
    assert resolved.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    attention_only = 4 * 8 * ((64 + 64) * 2 + (64 + 32) * 2)
    assert resolved.trainable_params > 3 * attention_only  # the experts dominate, as on a real Mixtral
    assert {"experts", "gate"} <= set(resolved.target_modules)
    # last half: exactly half of the adapter, experts included
    _, half = apply_scope(tiny_mixtral(), Scope(lora=LoraScope(r=8, alpha=16, dropout=0.0, layers="last-half")))
    assert half.trainable_params * 2 == resolved.trainable_params and half.layers == [2, 3]
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in half.lora_modules)


def test_fused_experts_with_dropout_is_one_clear_error() -> None:
    with pytest.raises(TunelabError, match=r"scope.lora.dropout: all-linear on MixtralForCausalLM reaches its fused"):
        apply_scope(tiny_mixtral(), Scope(lora=LoraScope(dropout=0.05)))


def test_the_default_dropout_gives_way_on_fused_experts_and_plan_says_so() -> None:
    """An experiment that does not set dropout trains a MoE model's all-linear scope (as PEFT can: without
    dropout) instead of stopping at the default; the same scope on attention keeps the default."""
    model, resolved = apply_scope(tiny_mixtral(), Scope(lora=LoraScope()))
    assert model.peft_config["default"].lora_dropout == 0.0
    assert resolved.warnings == [
        "scope.lora.dropout is 0 here, not the default 0.05: all-linear reaches the fused expert weights, which "
        "PEFT trains only without dropout (targets: attention keeps the experts out)"
    ]
    model, resolved = apply_scope(tiny_mixtral(), Scope(lora=LoraScope(targets="attention")))
    assert model.peft_config["default"].lora_dropout == 0.05 and resolved.warnings == []
    model, resolved = apply_scope(tiny_llama(), Scope(lora=LoraScope()))
    assert model.peft_config["default"].lora_dropout == 0.05 and resolved.warnings == []


def tiny_llama_config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=tied,
    )


def tiny_llama(tied: bool = False):
    return meta_model(tiny_llama_config(tied))


BLOCK = [
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
]


@pytest.mark.parametrize(
    ("indices", "text"),
    [([], ""), ([3], "3"), ([4, 5], "4-5"), ([0, 2, 4], "0, 2, 4"), ([0, 1, 2, 5, 7, 8], "0-2, 5, 7-8")],
)
def test_layer_ranges_reads_as_written(indices: list[int], text: str) -> None:
    from tunelab.scope import layer_ranges

    assert layer_ranges(indices) == text


def test_partial_blocks_embeddings_and_patterns_open_exactly_those_tensors() -> None:
    partial = PartialScope(blocks=[0, "2-3"], embeddings=True, patterns=[r"layers\.1\.input_layernorm"])
    _, resolved = apply_scope(tiny_llama(), Scope(partial=partial))
    by_hand = [f"model.layers.{i}.{n}" for i in (0, 2, 3) for n in BLOCK]
    by_hand += ["model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"]
    assert sorted(resolved.trainable_names) == sorted(by_hand) and len(resolved.trainable_names) == len(by_hand)
    assert resolved.layers == [0, 2, 3] and resolved.warnings == []


def test_partial_norm_alone_is_the_final_norm_and_untied_head_does_not_warn() -> None:
    _, resolved = apply_scope(tiny_llama(), Scope(partial=PartialScope(norm=True, lm_head=True)))
    assert resolved.trainable_names == ["model.norm.weight", "lm_head.weight"]  # the model's order
    assert resolved.layers == [] and resolved.warnings == []


def test_tied_head_warning_is_the_whole_sentence() -> None:
    _, resolved = apply_scope(tiny_llama(tied=True), Scope(partial=PartialScope(embeddings=True)))
    assert resolved.trainable_names == ["model.embed_tokens.weight"]
    assert resolved.warnings == [
        "lm_head is tied to the input embeddings (tie_word_embeddings): opening one opens the other, and both change"
    ]


@pytest.mark.parametrize(
    ("partial", "message"),
    [
        (PartialScope(blocks=[7]), "scope.partial.blocks"),
        (PartialScope(last_blocks=9), "scope.partial.last_blocks"),
        (PartialScope(patterns=["(unclosed"]), "scope.partial.patterns: '(unclosed' is not a valid regex ("),
    ],
)
def test_bad_partial_scopes_name_their_key(partial: PartialScope, message: str) -> None:
    with pytest.raises(TunelabError) as error:
        apply_scope(tiny_llama(), Scope(partial=partial))
    assert str(error.value).startswith(message)


def tiny_gemma3():
    """A vision-language model: its text decoder is model.language_model.layers, beside a vision tower's layers."""
    from transformers import Gemma3Config

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(num_key_value_heads=2, head_dim=16, vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config={**vision, "image_size": 32, "patch_size": 8})
    config.mm_tokens_per_image = 4
    return meta_model(config)


def test_final_norm_of_a_decoder_nested_two_deep_is_its_own() -> None:
    """The final norm of model.language_model.layers is model.language_model.norm, not something of the outer
    model."""
    _, resolved = apply_scope(tiny_gemma3(), Scope(partial=PartialScope(norm=True)))
    assert resolved.trainable_names == ["model.language_model.norm.weight"]


def test_layers_pattern_names_the_last_part_of_a_nested_decoders_path() -> None:
    from tunelab.scope import find_decoder

    decoder = find_decoder(tiny_gemma3(), "layers")
    assert (decoder.path, decoder.pattern, decoder.count) == ("model.language_model.layers", "layers", 2)
    with pytest.raises(TunelabError, match="layers_pattern: no list of decoder layers named 'language_model'"):
        find_decoder(tiny_gemma3(), "language_model")


def module_tree(num_hidden_layers: int, lists: dict[str, int]):
    """A bare module whose config says `num_hidden_layers`, holding a ModuleList of n Linears at each dotted path."""
    from torch import nn
    from transformers import PretrainedConfig

    root = nn.Module()
    root.config = PretrainedConfig(num_hidden_layers=num_hidden_layers)
    for path, n in lists.items():
        *parents, name = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(name, nn.ModuleList(nn.Linear(2, 2) for _ in range(n)))
    return root


def test_the_decoder_is_the_list_as_long_as_num_hidden_layers_even_below_another_list() -> None:
    """A list of another length nearer the top (here three heads) is not the decoder."""
    from tunelab.scope import find_decoder

    assert find_decoder(module_tree(2, {"heads": 3, "model.layers": 2})).path == "model.layers"


def test_every_lora_layer_scales_by_alpha_over_r_the_fused_experts_too() -> None:
    """Mixtral's fused gate_up experts get twice the rank (two projections in one); their alpha doubles with it, so
    every adapter's update is scaled by alpha / r, as PEFT's own all-linear would."""
    model, _ = apply_scope(tiny_mixtral(), Scope(lora=LoraScope(r=8, alpha=16, dropout=0.0)))
    layers = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    assert len(layers) == 4 * 7  # q, k, v, o, the router, down_proj and the gate_up_proj it wraps
    assert {m.scaling["default"] for m in layers.values()} == {16 / 8}
    fused = [n for n, m in layers.items() if m.r["default"] == 16]
    assert fused == [f"base_model.model.model.layers.{i}.mlp.experts.base_layer" for i in range(4)]


def test_the_adapter_has_the_dropout_the_scope_asks_for() -> None:
    model, _ = apply_scope(tiny_llama(), Scope(lora=LoraScope(r=4, alpha=8, dropout=0.1, targets="qv")))
    dropouts = [m.lora_dropout["default"] for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    assert len(dropouts) == 8 and {d.p for d in dropouts} == {0.1}


def test_of_two_lists_as_long_as_the_decoder_the_shallower_is_the_decoder() -> None:
    """Nearest the top wins, whatever the names: 'z.layers' (one level) over 'a.inner.layers' (two)."""
    from tunelab.scope import find_decoder

    assert find_decoder(module_tree(2, {"a.inner.layers": 2, "z.layers": 2})).path == "z.layers"


@pytest.mark.parametrize("tied", [False, True])
def test_a_partial_model_saves_only_its_opened_tensors(tmp_path: Path, tied: bool) -> None:
    """What a Trainer checkpoint of a partial run holds: the opened tensors, never the frozen rest, nor a frozen
    head under the name it shares with the embeddings."""
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    scope = Scope(partial=PartialScope(last_blocks=1, norm=True))
    model, resolved = apply_scope(LlamaForCausalLM(tiny_llama_config(tied)), scope)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert sorted(saved.keys()) == sorted(resolved.trainable_names)
    assert sorted(resolved.trainable_names) == sorted([f"model.layers.3.{n}" for n in BLOCK] + ["model.norm.weight"])
