"""Chat templates, generation markers, and the tokens that carry loss.

The loss mask is computed the way TRL's SFTTrainer computes it: `apply_chat_template` with
`return_assistant_tokens_mask=True` for chats, the shared prefix of prompt and prompt+completion for
prompt/completion data, every token for plain text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import BUILTIN_PREFIX
from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))


def resolve_template(setting: str | None, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template text for `tokenizer.chat_template`: the tokenizer's own, a built-in, or a file."""
    if setting is None:
        return tokenizer.chat_template
    if setting.startswith(BUILTIN_PREFIX):
        name = setting.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_TEMPLATES:
            raise ConfigError(
                f"tokenizer.chat_template: unknown built-in template '{setting}'; available: "
                + ", ".join(f"builtin:{n}" for n in BUILTIN_TEMPLATES)
            )
        return (TEMPLATE_DIR / f"{name}.jinja").read_text()
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"tokenizer.chat_template: template file '{setting}' not found")
    return path.read_text()


def has_generation_markers(template: str | None) -> bool:
    return template is not None and "generation" in template and "endgeneration" in template


def training_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """A template whose {% generation %} markers let the loss fall on assistant turns only.

    Templates TRL knows (Llama-3, Qwen, ...) get TRL's marked training version; others must carry markers.
    """
    from trl.chat_template_utils import get_training_chat_template

    fix = (
        "set tokenizer.chat_template to builtin:llama3 or to a .jinja file with {% generation %} ... "
        "{% endgeneration %} around each assistant reply"
    )
    if not tokenizer.chat_template:
        raise ConfigError(f"tokenizer.chat_template: the tokenizer has no chat template; {fix}")
    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError as e:
        raise ConfigError(
            "tokenizer.chat_template: the chat template has no {% generation %} markers and no "
            f"known training version, so the loss cannot be limited to assistant turns; {fix}"
        ) from e
    return patched or tokenizer.chat_template


def template_hash(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token carries loss


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"])


def tokenize_example(tokenizer: PreTrainedTokenizerBase, row: dict) -> Tokenized:
    """Tokens of one normalised SFT row and which of them carry loss."""
    if "messages" in row:
        if not tokenizer.chat_template:
            raise ConfigError(
                "tokenizer.chat_template: the tokenizer has no chat template; set one "
                "(e.g. builtin:llama3 or a .jinja file)"
            )
        out = tokenizer.apply_chat_template(
            row["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=has_generation_markers(tokenizer.chat_template),
        )
        ids = _ids(out)
        mask = list(out.get("assistant_masks") or [0] * len(ids))
        return Tokenized(ids, mask)
    if "prompt" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            prompt_ids = _ids(
                tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
            )
            ids = _ids(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True))
        else:
            prompt_ids = _ids(tokenizer(prompt))
            ids = _ids(tokenizer(prompt + completion + (tokenizer.eos_token or "")))
        n = _common_prefix(prompt_ids, ids)
        return Tokenized(ids, [0] * n + [1] * (len(ids) - n))
    ids = _ids(tokenizer(row["text"] + (tokenizer.eos_token or "")))
    return Tokenized(ids, [1] * len(ids))


def loss_segments(tokenizer: PreTrainedTokenizerBase, tok: Tokenized) -> list[tuple[str, bool]]:
    """Decoded text in runs of equal loss flag, for showing which tokens carry loss."""
    segments: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(tok.input_ids) + 1):
        if i == len(tok.input_ids) or tok.loss_mask[i] != tok.loss_mask[start]:
            text = tokenizer.decode(tok.input_ids[start:i])
            segments.append((text, bool(tok.loss_mask[start])))
            start = i
    return segments
