"""Image-text checkpoints (Gemma 3 4B-27B, Mistral Small 3.x) planned from their published config.json alone:
the scope reaches their language model and never the vision encoder, and the counts are the published ones."""

import re

import pytest

from tests.conftest import CONFIGS
from tunelab.config import LoraScope, ModelSettings, PartialScope, Scope
from tunelab.errors import ConfigError
from tunelab.models import load_config, meta_model
from tunelab.plan import model_facts
from tunelab.scopes import apply_scope

GEMMA3 = CONFIGS / "gemma-3-4b-it"
MISTRAL3 = CONFIGS / "mistral-small-3.2-24b-instruct"
# Parameters of the language model; the rest is the vision tower and projector.
GEMMA3_TEXT = 3_880_263_168
GEMMA3_TOWERS = 4_300_079_472 - GEMMA3_TEXT


def build(folder):
    return meta_model(load_config(ModelSettings(id=str(folder))))


def lora_count(shapes: list[tuple[int, int]], r: int, layers: int) -> int:
    return layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes)


@pytest.mark.parametrize(("folder", "published"), [(GEMMA3, 4_300_079_472), (MISTRAL3, 24_011_361_280)])
def test_totals_are_the_published_counts(folder, published: int) -> None:
    """Mistral Small's checkpoints hold their own lm_head; Transformers 5 defaults Mistral 3's wrapper to a tied one,
    which would count 671,088,640 parameters too few."""
    _, resolved = apply_scope(build(folder), Scope(lora=LoraScope(targets="qv")))
    base = resolved.total_params - resolved.trainable_params
    assert base == published


def test_plan_reads_the_language_models_dimensions() -> None:
    facts = model_facts("gemma-3-4b-it", build(GEMMA3))
    assert (facts.architecture, facts.layers, facts.hidden_size, facts.intermediate_size) == (
        "Gemma3ForConditionalGeneration",
        34,
        2560,
        10240,
    )
    assert (facts.kv_dim, facts.vocab_size, facts.tied_embeddings) == (4 * 256, 262_208, True)


def test_lora_qv_attaches_to_the_language_model_only() -> None:
    """SigLIP's attention has q_proj and v_proj too: a bare module name would put adapters on the vision tower."""
    model, resolved = apply_scope(build(GEMMA3), Scope(lora=LoraScope(targets="qv", r=16)))
    h, q, kv = 2560, 8 * 256, 4 * 256
    assert resolved.trainable_params == lora_count([(h, q), (h, kv)], 16, 34)
    assert len(resolved.lora_modules) == 2 * 34
    assert all(
        re.fullmatch(r"model\.language_model\.layers\.\d+\.self_attn\.[qv]_proj", n) for n in resolved.lora_modules
    )
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "vision" in n]
    assert resolved.layers == list(range(34))


def test_all_linear_on_the_last_half_of_mistral_small() -> None:
    model, resolved = apply_scope(build(MISTRAL3), Scope(lora=LoraScope(targets="all-linear", layers="last-half", r=8)))
    h, q, kv, i = 5120, 32 * 128, 8 * 128, 32768
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    assert resolved.trainable_params == lora_count(shapes, 8, 20)
    assert resolved.layers == list(range(20, 40))
    assert {n.split(".layers.")[0] for n in resolved.lora_modules} == {"model.language_model"}
    assert resolved.target_modules == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_a_regex_target_is_confined_to_the_language_model_and_its_layers() -> None:
    scope = LoraScope(targets=r".*\.(q|v)_proj", layers={"last": 2})
    _, resolved = apply_scope(build(GEMMA3), Scope(lora=scope))
    assert resolved.lora_modules == [
        f"model.language_model.layers.{i}.self_attn.{p}_proj" for i in (32, 33) for p in ("q", "v")
    ]


def test_partial_last4_norm_lm_head_opens_language_model_tensors() -> None:
    """Mistral Small's lm_head is its own tensor (not tied), so no tied-head warning; the image-text note names
    what stays frozen."""
    model, resolved = apply_scope(build(MISTRAL3), Scope(partial=PartialScope(last_blocks=4, norm=True, lm_head=True)))
    opened = set(resolved.trainable_names)
    blocks = {int(m.group(1)) for n in opened if (m := re.match(r"model\.language_model\.layers\.(\d+)\.", n))}
    assert blocks == {36, 37, 38, 39}
    assert opened - {n for n in opened if ".layers." in n} == {"model.language_model.norm.weight", "lm_head.weight"}
    per_block = 5120 * (4096 + 1024 + 1024) + 4096 * 5120 + 3 * 5120 * 32768 + 2 * 5120
    assert resolved.trainable_params == 4 * per_block + 5120 + 131072 * 5120
    assert not any("tied" in w for w in resolved.warnings)
    towers = [w for w in resolved.warnings if "image-text" in w]
    assert towers == [
        "Mistral3ForConditionalGeneration is an image-text model: the scope trains its language model on text; "
        "model.multi_modal_projector, model.vision_tower (438,958,080 parameters) stay frozen"
    ]


def test_full_fine_tuning_opens_everything_but_the_vision_encoder() -> None:
    model, resolved = apply_scope(build(GEMMA3), Scope(full=True))
    assert resolved.trainable_params == GEMMA3_TEXT
    assert resolved.total_params - resolved.trainable_params == GEMMA3_TOWERS
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"vision_tower", "multi_modal_projector"}
    assert f"({GEMMA3_TOWERS:,} parameters) stay frozen" in resolved.warnings[-1]


def test_a_model_that_generates_no_text_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTForImageClassification"]}')
    config = load_config(ModelSettings(id=str(tmp_path)))
    with pytest.raises(
        ConfigError, match=r"^model.id: a 'vit' model \(ViTForImageClassification\) does not generate text"
    ):
        meta_model(config)


def default_config_folder(tmp_path, model_type: str, **kwargs):
    """A config.json as Transformers writes the defaults of `model_type` (its reference checkpoint's sizes)."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type, **kwargs).save_pretrained(tmp_path)
    return tmp_path


def test_qwen2_5_vl_plans_its_language_model_with_the_vision_encoder_frozen(tmp_path) -> None:
    """Qwen2.5-VL's text config has no tie_word_embeddings of its own: the wrapper's stands."""
    model = build(default_config_folder(tmp_path, "qwen2_5_vl"))
    _, resolved = apply_scope(model, Scope(lora=LoraScope(targets="qv")))
    assert {n.split(".layers.")[0] for n in resolved.lora_modules} == {"model.language_model"}
    assert any(w.endswith("stay frozen") and "model.visual" in w for w in resolved.warnings)


def test_a_module_peft_cannot_adapt_is_one_line_naming_the_targets(tmp_path) -> None:
    model = build(default_config_folder(tmp_path, "mamba", num_hidden_layers=2, hidden_size=64))
    with pytest.raises(ConfigError, match=r"^scope.lora.targets: PEFT cannot put LoRA on MambaForCausalLM as asked: "):
        apply_scope(model, Scope(lora=LoraScope(targets=["out_proj"])))
    _, resolved = apply_scope(build(tmp_path), Scope(lora=LoraScope(targets=["in_proj", "x_proj"])))
    assert resolved.target_modules == ["in_proj", "x_proj"]
    # A preset leaves out what PEFT refuses here, and says so
    _, resolved = apply_scope(build(tmp_path), Scope(lora=LoraScope(targets="all-linear")))
    assert resolved.target_modules == ["dt_proj", "in_proj", "x_proj"]
    assert resolved.warnings[0].startswith("all-linear leaves out out_proj on MambaForCausalLM: LoRA cannot go on them")


def test_a_model_that_needs_a_package_not_installed_is_one_line(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    folder = default_config_folder(tmp_path, "gemma3n")
    with pytest.raises(
        ConfigError, match=r"^model.id: building a 'gemma3n' model needs a package that is not installed: .*timm"
    ) as e:
        build(folder)
    assert "\n" not in str(e.value)
