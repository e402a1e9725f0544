"""Training objectives, one module each, registered here by name.

Adding a method: a module that defines `METHOD = Method(...)` (tunelab.methods.base), its settings
section in tunelab.config, and a line below; docs/adding-a-method.md walks through it.
"""

from __future__ import annotations

from tunelab.methods import distill, dpo, grpo, kto, orpo, reward, sft, simpo
from tunelab.methods.base import Method

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (sft.METHOD, dpo.METHOD, kto.METHOD, orpo.METHOD, simpo.METHOD, grpo.METHOD, distill.METHOD, reward.METHOD)
}


def get_method(name: str) -> Method:
    return REGISTRY[name]
