"""Every causal-LM architecture this Transformers ships, planned on the meta device at small sizes with each kind of
scope: it resolves, or it is refused in one line naming the setting (ConfigError), never another exception. Users bring
models tunelab has not seen; this is how the MoE, hybrid-Mamba and GPT-2 shapes were found (a LoRA preset crashed on
GPT-2's Conv1D layers, Falcon-H1's all-linear on PEFT's refusal, Nemotron-H's attention preset matched nothing)."""

from __future__ import annotations

import pytest

from tunelab.config import Scope
from tunelab.errors import ConfigError
from tunelab.models import meta_model
from tunelab.plan import planned_scope

pytestmark = pytest.mark.slow

SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256,
)  # fmt: skip
SCOPES = [
    {"lora": {"targets": "all-linear"}},
    {"lora": {"targets": "attention"}},
    {"lora": {"targets": "mlp", "layers": "last-half"}},
    {"lora": {"targets": "all-linear", "open": ["norm", "lm_head"]}},
    {"partial": {"last_blocks": 2, "norm": True, "lm_head": True}},
    "full",
]


def small_configs():
    """(model_type, config) for every causal-LM model type whose config Transformers builds at these sizes on the meta
    device (some need a package or sizes of their own: those are left out)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = AutoConfig.for_model(model_type)
            for key, value in SIZES.items():
                if hasattr(config, key):
                    setattr(config, key, value)
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                setattr(config, key, None)
            for key in ("num_local_experts", "num_experts", "n_routed_experts"):
                if isinstance(getattr(config, key, None), int):
                    setattr(config, key, 4)
            meta_model(config)
        except Exception:  # not buildable here at these sizes: nothing to plan
            continue
        yield model_type, config


def test_every_causal_lm_architecture_plans_or_is_refused_in_one_line() -> None:
    crashes, planned, built = [], 0, 0
    for model_type, config in small_configs():
        built += 1
        for scope in SCOPES:
            try:
                planned_scope(meta_model(config), Scope.model_validate(scope))
                planned += 1
            except ConfigError as e:
                assert "\n" not in str(e), f"{model_type} {scope}: {e}"
            except Exception as e:
                crashes.append(f"{model_type} {scope}: {type(e).__name__}: {str(e)[:200]}")
    assert crashes == []
    assert built >= 150 and planned >= 0.8 * built * len(SCOPES)  # the catalogue, and most of it plans
