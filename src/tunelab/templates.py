"""Chat templates and the tokens that carry loss, for any template.

The supervised span of an assistant turn is derived from the model's own template: render the
conversation up to that turn with the generation prompt, render it through the turn, and the
difference is what the model must produce. The span runs from there up to and including the turn
terminator (the first special token after the reply, e.g. `<|eot_id|>`, `<|im_end|>`, `</s>`); what a
template prints after it (a newline) is not something the model generates. A template that marks
assistant output with `{% generation %}` is taken at its word instead. `plan` and `train` both call
`encode`, so the plan's preview is exactly what the trainer is given.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, overload

from tunelab.config import BUILTIN_PREFIX, TokenizerSettings, inline_template
from tunelab.errors import ConfigError, TunelabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
# Tokens people name as padding, in order of preference; the first one the tokenizer has is used.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


def trl_templates() -> Path:
    """TRL's folder of chat templates (the originals it recognises and their training versions), found
    without importing TRL."""
    import importlib.util

    spec = importlib.util.find_spec("trl")
    return Path(spec.origin).parent / "chat_templates" if spec and spec.origin else Path("/nonexistent")


def resolve_template(setting: str | None, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The template text for `tokenizer.chat_template`: the tokenizer's own, a built-in, one of TRL's, a file, or the
    Jinja text given in the setting itself."""
    if setting is None:
        return tokenizer.chat_template
    if inline_template(setting):
        return setting
    if setting.startswith("trl:"):
        path = trl_templates() / f"{setting.removeprefix('trl:')}.jinja"
        if not path.is_file():
            names = sorted(p.stem for p in trl_templates().glob("*_training.jinja"))
            raise ConfigError(
                f"tokenizer.chat_template: TRL has no template '{setting}'; its training templates: "
                + ", ".join(f"trl:{n}" for n in names)
            )
        return path.read_text()
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
    return template is not None and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def template_hash(template: str | dict[str, str] | None) -> str | None:
    """A template's digest; of named templates ({"default": ..., "tool_use": ...}), of all of them."""
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token carries loss
    terminators: list[int] = field(default_factory=list)  # the token that closes each supervised span
    unterminated: int = 0  # supervised spans that no special token closes


ARROW_LIST_TOKENS = 2**31 - 1  # an Arrow list array's 32-bit offsets address this many values


class TokenizedRows(Sequence[Tokenized]):
    """Tokenized rows kept as columns: every row's ids (32-bit) and loss mask (a byte a token) end to end, and where
    each row starts. A list of Tokenized holds each id as a Python int, about 40 bytes a token: 10 GB for UltraChat's
    250 million tokens, per training process; these columns take 5 bytes a token. Indexing gives a row as a Tokenized
    of lists."""

    def __init__(self) -> None:
        self._ids = array("i")
        self._mask = array("b")
        self._starts = array("q", [0])
        self._closing: list[tuple[list[int], int]] = []  # per row: terminators, unterminated

    def append(self, row: Tokenized) -> None:
        self._ids.extend(row.input_ids)
        self._mask.extend(row.loss_mask)
        self._starts.append(len(self._ids))
        self._closing.append((list(row.terminators), row.unterminated))

    def extend(self, rows: TokenizedRows) -> None:
        """The rows of another, after these."""
        self._starts.extend(start + len(self._ids) for start in rows._starts[1:])
        self._ids.extend(rows._ids)
        self._mask.extend(rows._mask)
        self._closing.extend(rows._closing)

    def __len__(self) -> int:
        return len(self._closing)

    @overload
    def __getitem__(self, i: int) -> Tokenized: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tokenized]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self._starts[i], self._starts[i + 1]
        terminators, unterminated = self._closing[i]
        return Tokenized(self._ids[a:b].tolist(), self._mask[a:b].tolist(), list(terminators), unterminated)

    def columns(self):
        """(ids int32, loss mask int8, offsets int64: row i is [offsets[i], offsets[i+1])) as numpy arrays over
        the columns' own memory."""
        import numpy as np

        return (
            np.frombuffer(self._ids, dtype=np.intc),
            np.frombuffer(self._mask, dtype=np.int8),
            np.frombuffer(self._starts, dtype=np.int64),
        )


@dataclass
class Encoded:
    """A split, tokenized and masked, with what the checks found."""

    examples: TokenizedRows
    origins: list[str]
    no_loss: list[str]  # where rows with no supervised token come from
    all_loss: list[str]  # chat rows where every token is supervised
    unterminated: list[str]
    terminators: Counter
    sampled: bool = False  # GRPO's prompts as sampling continues them: nothing supervised, and none missing it

    def no_loss_after(self, max_length: int) -> list[str]:
        """Rows left without a supervised token once truncated to max_length (the trainer drops them)."""
        if self.sampled:
            return []
        return [o for o, n in zip(self.origins, self.loss_tokens(max_length), strict=True) if not n]

    def lengths(self):
        """Each row's token count (numpy)."""
        import numpy as np

        return np.diff(self.examples.columns()[2])

    def loss_tokens(self, max_length: int):
        """Each row's tokens that carry loss within its first `max_length` (numpy)."""
        import numpy as np

        _, mask, offsets = self.examples.columns()
        # Loss tokens before each row's end, and before its cut: a cumulative sum read at those places.
        total = np.concatenate(([0], np.cumsum(mask, dtype=np.int64)))
        cut = np.minimum(offsets[1:], offsets[:-1] + max_length)
        return total[cut] - total[offsets[:-1]]

    def dataset(self, limit: int = ARROW_LIST_TOKENS):
        """The rows as the trainer takes them: input_ids and labels (-100 where no loss falls), an Arrow-backed
        `datasets.Dataset` built from the columns, with no Python object per token; in arrays of at most `limit`
        tokens (an Arrow list array's 32-bit offsets address 2**31 - 1)."""
        import numpy as np
        import pyarrow as pa
        from datasets import Dataset

        ids, mask, offsets = self.examples.columns()
        labels = np.where(mask.astype(bool), ids, np.intc(-100))
        chunks: dict[str, list] = {"input_ids": [], "labels": []}
        for first, last in _chunks(offsets, limit):
            local = pa.array(offsets[first : last + 1] - offsets[first], type=pa.int32())
            a, b = offsets[first], offsets[last]
            for name, values in (("input_ids", ids), ("labels", labels)):
                chunks[name].append(pa.ListArray.from_arrays(local, pa.array(values[a:b], type=pa.int32())))
        table = pa.table({name: pa.chunked_array(c, type=pa.list_(pa.int32())) for name, c in chunks.items()})
        return Dataset(table)


def _chunks(offsets, limit: int) -> list[tuple[int, int]]:
    """Row ranges [first, last) whose tokens fit one Arrow list array each (at least one range, one row)."""
    import numpy as np

    ranges, first, rows = [], 0, len(offsets) - 1
    while True:
        last = int(np.searchsorted(offsets, offsets[first] + limit, side="right")) - 1
        last = min(max(last, first + 1), rows)
        ranges.append((first, last))
        if last >= rows:
            return ranges
        first = last


class TemplateRowError(TunelabError):
    pass


# ---------------------------------------------------------------- rendering


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str, **kwargs):
    """`apply_chat_template`, with the template's own errors turned into one line naming the record and the fix;
    the messages' contents in the form the template prints (see `as_template_reads`)."""
    from jinja2 import TemplateError

    template = kwargs.get("chat_template") or tokenizer.get_chat_template(tools=kwargs.get("tools"))
    try:
        return tokenizer.apply_chat_template(as_template_reads(messages, template, tokenizer), **kwargs)
    except TemplateError as e:
        raise TemplateRowError(
            f"{where}: the chat template refused this conversation: {e}; {refusal_fix(e, messages)}"
        ) from e
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise TemplateRowError(
            f"{where}: the chat template failed on this conversation ({type(e).__name__}: {e}); "
            "check the record's roles and contents, or set tokenizer.chat_template"
        ) from e


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    generation_prompt: bool,
    where: str,
    context: dict | None = None,
) -> str:
    return _apply(
        tokenizer, messages, where, **(context or {}), tokenize=False, add_generation_prompt=generation_prompt
    )


def as_template_reads(messages: list[dict], template: str, tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """`messages` with their text contents as text parts ([{"type": "text", "text": ...}]) for a template that prints
    only those (SmolVLM's, Idefics3's and LLaVA-NeXT's, written for image-text chats), as they are otherwise."""
    return text_parts(messages) if reads_text_parts(template, tokenizer) else messages


def text_parts(messages: list[dict]) -> list[dict]:
    """Each message whose content is a string, with it as one text part."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in messages
    ]


_TEXT_PARTS: dict[tuple, bool] = {}


def reads_text_parts(template: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `template` prints a message's text only when it comes as text parts, found by rendering PROBE both
    ways. Raises ConfigError for a template that prints it neither way: every reply would train as empty."""
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _TEXT_PARTS:
        as_strings = _prints_contents(tokenizer, template, PROBE)
        as_parts = not as_strings and _prints_contents(tokenizer, template, text_parts(PROBE))
        if as_strings is False and not as_parts:
            raise ConfigError(
                "tokenizer.chat_template: the chat template prints no message's text, given as a string or as text "
                "parts, so every reply would train as empty; set tokenizer.chat_template to a template that prints "
                "message['content']"
            )
        _TEXT_PARTS[key] = bool(as_parts)
    return _TEXT_PARTS[key]


def _prints_contents(tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict]) -> bool | None:
    """Whether the template prints every message's text; None where it refuses the conversation."""
    try:
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:
        return None
    return all(m["content"] in rendered for m in PROBE)


def refusal_fix(error: Exception, messages: list[dict]) -> str:
    """The setting or change that gets a conversation past a chat template's refusal (`error`)."""
    text = str(error).lower()
    roles = [m["role"] for m in messages]
    if "system" in text and "system" in roles:
        return "set tokenizer.fold_system: true to put the system message at the start of the first user turn"
    if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
        return "set data.merge_consecutive_turns: true to join consecutive messages of the same role"
    if "alternate" in text or "roles" in text:
        return "make the conversation start with a user turn and alternate user/assistant"
    if "tool call id" in text and "9" in text:  # Mistral's: OpenAI's call_... ids are longer
        return (
            "give each tool call an id of 9 letters and digits, and the tool message that answers it the same "
            "tool_call_id, as Mistral's format has them"
        )
    return "fix the record, or set tokenizer.chat_template to a template that accepts it"


def prepare_messages(messages: list[dict], fold_system: bool) -> list[dict]:
    """Messages as the template sees them (without tunelab's per-turn weight), the system message folded if asked."""
    out = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    if fold_system and out and out[0]["role"] == "system":
        system, rest = out[0]["content"], out[1:]
        first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first_user is None:
            return rest
        rest[first_user] = {"role": "user", "content": f"{system}\n\n{rest[first_user]['content']}"}
        return rest
    return out


# ---------------------------------------------------------------- masks


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False))
    return ids


def special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [t for t in tokenizer.convert_ids_to_tokens(sorted(special_ids(tokenizer))) if t]


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    supervised: list[bool],
    where: str,
    context: dict | None = None,
) -> tuple[str, list[tuple[int, int, int]]]:
    """The full text and, per supervised assistant turn, (start, end of the reply, end of the turn) in characters.
    `context`: what the template sees beside the messages (the row's tools, the experiment's template variables)."""
    context = context or {}
    full = _render(tokenizer, messages, False, where, context)
    closers = special_texts(tokenizer) if any(m.get("tool_calls") for m in messages) else []
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not supervised[i]:
            continue
        prompt = _render(tokenizer, messages[:i], True, where, context) if i else ""
        through = _render(tokenizer, messages[: i + 1], False, where, context)
        end = len(prompt) + _common_prefix(through[len(prompt) :], full[len(prompt) :])
        reply = m["content"].strip()
        found = full.find(reply, len(prompt), end) if reply else len(prompt)
        consistent = through.startswith(prompt) and full.startswith(prompt)
        if not consistent or found < 0:
            if not consistent and _same_but_spaces(prompt, through) and _same_but_spaces(prompt, full):
                raise TemplateRowError(
                    f"{where}: the chat template writes other whitespace between turns when it ends with the "
                    f"generation prompt than when the conversation goes on (before assistant message {i}): it prints "
                    "the indentation and line breaks between its tags, so a reply would not sit where the model is "
                    "asked for it; trim them in the template ({%- ... -%} tags, or the whitespace between tags "
                    "removed, as collections of such files say to do)"
                )
            if (prefill := _prefill(tokenizer, messages[:i], prompt, through, where, context)) is not None:
                raise TemplateRowError(
                    f"{where}: the chat template's generation prompt goes on with {prefill!r}, which assistant message "
                    f"{i} does not begin with once written out (the template starts a reasoning block for generation "
                    "only), so its reply cannot be supervised where the model is asked for it; "
                    + _consistent_fix(tokenizer.get_chat_template(tools=context.get("tools")), messages)
                )
            raise TemplateRowError(
                f"{where}: the chat template renders assistant message {i} differently once the conversation "
                "continues (a system message moved into the last user turn, or a reasoning block kept only on the "
                "last turn), so its reply cannot be supervised where it sits; "
                + _consistent_fix(tokenizer.get_chat_template(tools=context.get("tools")), messages)
            )
        reply_end = found + len(reply)
        if m.get("tool_calls"):
            # The template writes the calls in its own syntax, which may hold special tokens of its own
            # (<tool_call>): the turn's terminator is the last special token before the next message.
            closings = [full.rfind(t, reply_end, end) for t in closers]
            reply_end = max([reply_end, *closings])
        spans.append((len(prompt), reply_end, end))
    return full, spans


def _prefill(
    tokenizer: PreTrainedTokenizerBase, before: list[dict], prompt: str, through: str, where: str, context: dict
) -> str | None:
    """What the generation prompt writes that the reply, once written out, does not begin with (MiniMax-M2's and
    Nemotron-Nano-v2's templates open a <think> block after the assistant's header for generation only), where the
    conversation so far is where both go on; None otherwise. `prompt`: `before` rendered with the generation
    prompt."""
    if not before:  # a reply that opens the conversation has no generation prompt before it
        return None
    so_far = _render(tokenizer, before, False, where, context)
    if not (prompt.startswith(so_far) and through.startswith(so_far)):
        return None
    cue, reply = prompt[len(so_far) :], through[len(so_far) :]
    return cue[_common_prefix(cue, reply) :] or None


def _same_but_spaces(prompt: str, full: str) -> bool:
    """Whether the conversation so far with the generation prompt (`prompt`) is where `full` goes on but for
    whitespace."""
    squeeze = functools.partial(re.sub, r"\s+", "")
    return squeeze(full).startswith(squeeze(prompt))


def _consistent_fix(template: str, messages: list[dict]) -> str:
    """The fix for a template that is not prefix-consistent: TRL's training version where TRL has one."""
    training = trl_training_version(template)
    if training is not None:
        return (
            f"set tokenizer.chat_template: trl:{training[0]} (TRL's training version of this template, "
            "which marks each reply with {% generation %})"
        )
    fold = "set tokenizer.fold_system: true, or " if messages and messages[0]["role"] == "system" else ""
    return f"{fold}set tokenizer.chat_template to a template that marks replies with {{% generation %}}"


@functools.lru_cache(maxsize=16)
def trl_training_version(template: str | None) -> tuple[str, str] | None:
    """(name, text) of TRL's training version of exactly this template (an original TRL recognises), or None."""
    folder = trl_templates()
    for original in sorted(folder.glob("*.jinja")):
        training = folder / f"{original.stem}_training.jinja"
        if not original.stem.endswith("_training") and training.is_file() and original.read_text() == template:
            return training.stem, training.read_text()
    return None


# Fields of an assistant message that chat templates render as its reasoning (Qwen3 and DeepSeek read
# reasoning_content; gpt-oss and LFM2.5 thinking; some read reasoning).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Two exchanges: enough to see a template render an earlier reply differently once the conversation goes on. The
# replies carry reasoning, which some templates keep on the last turn only (gpt-oss drops an earlier reply's analysis).
PROBE = [
    {"role": "user", "content": "Hello?"},
    {"role": "assistant", "content": "Hello.", **dict.fromkeys(REASONING_FIELDS, "Hi.")},
    {"role": "user", "content": "And again?"},
    {"role": "assistant", "content": "Again.", **dict.fromkeys(REASONING_FIELDS, "Re.")},
]
_MASKING: dict[tuple, tuple[str | None, str | None]] = {}


def masking_template(
    tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> tuple[str | None, str | None]:
    """(the template the loss masks are derived from, the name of TRL's training version when it stands in).

    The model's own template wherever it renders each reply where it stays and closes it with a special token.
    Some do not: Qwen3 keeps a <think> block on the last turn only, DeepSeek-R1 prefills the prompt with <think>,
    GLM-4.5 ends a reply with nothing (the next turn's <|user|> stops generation). For those TRL ships a training
    version that marks each reply, and its end, with {% generation %}; it is used for the masks, as TRL's
    SFTTrainer does, while the run's tokenizer keeps the model's own template for generation.
    """
    # The template Transformers renders with: the tokenizer's own, or of named ones the tool_use or default one.
    template = tokenizer.get_chat_template(tools=tools)
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _MASKING:
        training = None if has_generation_markers(template) else trl_training_version(template)
        if training is not None and _places_every_reply(tokenizer):
            training = None
        _MASKING[key] = (training[1], training[0]) if training else (template, None)
    return _MASKING[key]


def _places_every_reply(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's template renders each reply of a two-exchange chat where it stays, closed by a
    special token."""
    try:
        probe = Rendered(*_assistant_spans(tokenizer, PROBE, [True] * len(PROBE), "probe"))
    except TemplateRowError:
        return False
    return _tokenized(tokenizer, [probe])[0].unterminated == 0


@dataclass
class Rendered:
    """A conversation rendered as text, with the character spans its loss covers: tokenized in batches."""

    text: str
    spans: list[tuple[int, int, int]]  # per supervised turn: (start, end of the reply, end of the turn)


def _tokenized(tokenizer: PreTrainedTokenizerBase, prepared: list[Tokenized | Rendered]) -> list[Tokenized]:
    """Tokenize the rendered conversations among `prepared` in one batch (the tokenizer's Rust side spreads a
    batch over the cores) and mask their spans; the rows already tokenized stay as they are."""
    rendered = [p for p in prepared if isinstance(p, Rendered)]
    if not rendered:
        return list(prepared)
    if not tokenizer.is_fast:
        raise ConfigError(
            "tokenizer: a fast tokenizer (tokenizer.json) is needed to locate assistant replies; "
            "point tokenizer.id at a folder with tokenizer.json"
        )
    batch = tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
    specials = special_ids(tokenizer)
    masked = iter(
        _mask_spans(list(ids), [tuple(o) for o in offsets], r.spans, specials)
        for r, ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"], strict=True)
    )
    return [next(masked) if isinstance(p, Rendered) else p for p in prepared]


def _mask_spans(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]], specials: set[int]
) -> Tokenized:
    # Token offsets run in text order, so each span's tokens are found by bisection: linear in the row, not in
    # rows x turns.
    starts = [a for a, _ in offsets]
    mask = [0] * len(ids)
    terminators, unterminated = [], 0
    for start, reply_end, end in spans:
        closing = bisect.bisect_left(starts, reply_end)
        while closing < len(ids) and starts[closing] < end and ids[closing] not in specials:
            closing += 1
        if closing < len(ids) and starts[closing] < end:
            stop = offsets[closing][1]
            terminators.append(ids[closing])
        else:
            stop = end
            unterminated += 1
        for j in range(bisect.bisect_left(starts, start), bisect.bisect_left(starts, stop)):
            if offsets[j][1] > offsets[j][0]:
                mask[j] = 1
    return Tokenized(ids, mask, terminators, unterminated)


def _marked(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    supervised: list[bool],
    where: str,
    template: str,
    context: dict | None = None,
) -> Tokenized:
    """A template with {% generation %} markers: its own mask, one run of ones per assistant turn."""
    out = _apply(
        tokenizer,
        messages,
        where,
        chat_template=template,
        **(context or {}),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    turns = [s for m, s in zip(messages, supervised, strict=True) if m["role"] == "assistant"]
    if not all(turns):
        if len(runs) != len(turns):
            raise TemplateRowError(
                f"{where}: per-turn weights need one {{% generation %}} block per assistant turn in the template"
            )
        for run, keep in zip(runs, turns, strict=True):
            if not keep:
                j = run
                while j < len(mask) and mask[j]:
                    mask[j] = 0
                    j += 1
    # A run's terminator is its last special token (a template may mark the newline after it too).
    specials = special_ids(tokenizer)
    terminators, unterminated, last_special = [], 0, None
    for i, m in enumerate(mask):
        if m and ids[i] in specials:
            last_special = ids[i]
        if m and (i + 1 == len(mask) or not mask[i + 1]):
            if last_special is None:
                unterminated += 1
            else:
                terminators.append(last_special)
            last_special = None
    return Tokenized(ids, mask, terminators, unterminated)


def _chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    supervised: list[bool],
    where: str,
    context: dict | None = None,
) -> Tokenized | Rendered:
    """One conversation's tokens and mask, or its text and spans to tokenize with others; `context`: what the template
    sees beside the messages (the row's tool definitions, the experiment's template variables)."""
    context = context or {}
    if not tokenizer.chat_template:
        raise ConfigError(
            "tokenizer.chat_template: the tokenizer has no chat template; set one "
            "(a .jinja file, or builtin:llama3 for a model trained on that format)"
        )
    template, _ = masking_template(tokenizer, context.get("tools"))
    if has_generation_markers(template):
        return _marked(tokenizer, messages, supervised, where, template, context)
    return Rendered(*_assistant_spans(tokenizer, messages, supervised, where, context))


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"])


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    row: dict,
    where: str = "record",
    fold_system: bool = False,
    template_vars: dict | None = None,
) -> Tokenized:
    """Tokens of one normalised SFT row and which of them carry loss."""
    return _tokenized(tokenizer, [_prepare(tokenizer, row, where, fold_system, template_vars or {})])[0]


def _prepare(
    tokenizer: PreTrainedTokenizerBase, row: dict, where: str, fold_system: bool, template_vars: dict
) -> Tokenized | Rendered:
    context = {**template_vars, "tools": row.get("tools")}
    if row.get("sample"):  # GRPO: the prompt as sampling continues it, as TRL renders it; nothing is supervised
        prompt = row["prompt"]
        if isinstance(prompt, str):
            ids = _ids(tokenizer(prompt))
        else:
            text = _render(tokenizer, prepare_messages(prompt, fold_system), True, where, context)
            ids = _ids(tokenizer(text, add_special_tokens=False))
        return Tokenized(ids, [0] * len(ids))
    if "messages" in row:
        messages = prepare_messages(row["messages"], fold_system)
        supervised = [m.get("weight", 1) != 0 for m in row["messages"]]
        if len(messages) < len(supervised):  # the system message was folded away
            supervised = supervised[1:]
        return _chat(tokenizer, messages, supervised, where, context)
    if "prompt" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            messages = prepare_messages(prompt + completion, fold_system)
            n_prompt = len(messages) - len(completion)
            supervised = [i >= n_prompt for i in range(len(messages))]
            return _chat(tokenizer, messages, supervised, where, context)
        eos = tokenizer.eos_token or ""
        prompt_ids = _ids(tokenizer(prompt))
        ids = _ids(tokenizer(prompt + completion + eos))
        n = _common_prefix(prompt_ids, ids)
        closing = [ids[-1]] if eos and ids and ids[-1] == tokenizer.eos_token_id else []
        return Tokenized(ids, [0] * n + [1] * (len(ids) - n), closing, 0 if closing else 1)
    ids = _ids(tokenizer(row["text"] + (tokenizer.eos_token or "")))
    return Tokenized(ids, [1] * len(ids))


TEMPLATE_DATE = "26 Jul 2024"  # Llama 3.x templates' own fallback, where no clock is at hand


def template_vars(settings: TokenizerSettings, tokenizer: PreTrainedTokenizerBase) -> dict:
    """What the chat template sees beside each conversation: the experiment's tokenizer.template_vars and, for a
    template that would write today's date into every system turn (Llama 3.2 and 3.3 read date_string, else the
    clock), a fixed date, so the same experiment renders the same tokens on any day."""
    out = dict(settings.template_vars)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "date_string" in template and "date_string" not in out:
        out["date_string"] = TEMPLATE_DATE
    return out


def for_outside_renderer(tokenizer: PreTrainedTokenizerBase, variables: dict) -> PreTrainedTokenizerBase:
    """The tokenizer with its chat template made to render, for a renderer that passes only string contents and no
    variables (lm-eval), as training renders: `variables` set at its top, and for a template that prints a message's
    text only from text parts, the string contents turned into parts first."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return tokenizer
    prelude = "".join(f"{{%- set {name} = {json.dumps(value)} -%}}" for name, value in variables.items())
    if reads_text_parts(template, tokenizer):
        prelude += TEXT_PARTS_PRELUDE
    tokenizer.chat_template = prelude + template
    return tokenizer


# Jinja that gives each message whose content is a string that text as one text part (text_parts, in the template).
TEXT_PARTS_PRELUDE = (
    "{%- set parts = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set parts.messages = parts.messages + [dict(m, content=[{'type': 'text', 'text': m['content']}])] -%}"
    "{%- else -%}{%- set parts.messages = parts.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = parts.messages -%}"
)


def reads_the_clock(tokenizer: PreTrainedTokenizerBase, variables: dict) -> bool:
    """Whether the chat template, given these variables, still writes the current date (strftime_now), as gpt-oss's
    and Mistral Small's do unconditionally. Rendered once with the clock replaced by a call that fails."""
    from jinja2 import TemplateError

    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "strftime_now" not in template:
        return False
    probe = template.replace("strftime_now(", "raise_exception(")
    try:
        tokenizer.apply_chat_template(PROBE, chat_template=probe, tokenize=False, **variables)
    except TemplateError as e:
        return "%" in str(e)  # the failing call received the date format, not a message of the template's own
    except (TypeError, KeyError, IndexError, AttributeError, ValueError):
        return False
    return False


ENCODE_BATCH = 256  # rows tokenized per call


# ---------------------------------------------------------------- tool calls


_TOOL_NAME, _ARGUMENT, _VALUE, _RESULT = (
    "probe_tool_a8f3e2",
    "probe_key_b9d4f5",
    "probe_value_d6e7a9",
    "probe_result_c4f9a8",
)
TOOL_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": _TOOL_NAME,
            "description": "A probe.",
            "parameters": {"type": "object", "properties": {_ARGUMENT: {"type": "string"}}, "required": [_ARGUMENT]},
        },
    }
]
TOOL_PROBE = [
    {"role": "user", "content": "Hello?"},
    {
        "role": "assistant",
        "content": "",  # as tunelab reads a turn that only calls tools (OpenAI's content null)
        "tool_calls": [
            {"id": "a1b2c3d4e", "type": "function", "function": {"name": _TOOL_NAME, "arguments": {_ARGUMENT: _VALUE}}}
        ],  # an id of 9 letters and digits, as Mistral's template demands
    },
    {"role": "tool", "name": _TOOL_NAME, "tool_call_id": "a1b2c3d4e", "content": _RESULT},
]


class ToolPrinting(NamedTuple):
    """What a chat template prints of tool use."""

    definitions: bool  # the tool definitions a conversation is given (`tools`)
    calls: bool  # an assistant turn's tool_calls: the function's name and arguments
    results: bool  # a tool message's content


_PRINTS_TOOLS: dict[tuple, ToolPrinting] = {}


def prints_tools(tokenizer: PreTrainedTokenizerBase, template: str) -> ToolPrinting:
    """What `template` prints of tool use, found by rendering TOOL_PROBE once per template. Llama 3's prints tool
    results (any role's content) but neither calls nor definitions, Phi-3's none of them; DeepSeek-R1's distills
    print a call only where the turn's content is null, which tunelab reads as an empty string, as TRL's
    supports_tool_calling does."""
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _PRINTS_TOOLS:

        def after_question(messages: list[dict], generation: bool = False) -> str:
            try:
                text = _apply(tokenizer, messages, "probe", tools=TOOL_PROBE_TOOLS, chat_template=template,
                              tokenize=False, add_generation_prompt=generation)  # fmt: skip
            except TemplateRowError:
                return ""
            return text if generation else text.split("Hello?", 1)[-1]

        system = {"role": "system", "content": "Be brief."}  # some templates print the tools in its turn only
        shown = after_question(TOOL_PROBE[:1], True) + after_question([system, *TOOL_PROBE[:1]], True)
        called, answered = after_question(TOOL_PROBE[:2]), after_question(TOOL_PROBE)
        _PRINTS_TOOLS[key] = ToolPrinting(_TOOL_NAME in shown, _TOOL_NAME in called and _VALUE in called,
                                          _RESULT in answered)  # fmt: skip
    return _PRINTS_TOOLS[key]


def _messages_of(row: dict) -> list[dict]:
    messages = [*(row.get("messages") or [])]
    for key in ("prompt", "completion"):
        if isinstance(row.get(key), list):
            messages += row[key]
    return messages


def check_tool_rows(tokenizer: PreTrainedTokenizerBase, rows: list[dict], origins: list[str]) -> None:
    """Rows that use tools train on what the chat template prints of them: a template that prints no tool call
    (Llama 3's, Phi-3's) would train a call as an empty reply, one that prints no tool result would train the answer
    after it without what it answers, one that prints no definitions would teach calls to tools the model is never
    shown. Each is one line naming the first row that needs what the template lacks."""

    def first(needs) -> str | None:
        return next((where for row, where in zip(rows, origins, strict=True) if needs(row)), None)

    calling = first(lambda row: any(m.get("tool_calls") for m in _messages_of(row)))
    answered = first(lambda row: any(m.get("role") == "tool" for m in _messages_of(row)))
    described = first(lambda row: bool(row.get("tools")))
    if calling is None and answered is None and described is None:
        return
    template, _ = masking_template(tokenizer, TOOL_PROBE_TOOLS)
    if template is None:
        return  # no chat template: _chat says so
    printing = prints_tools(tokenizer, template)
    fix = "set tokenizer.chat_template to a version of the model's template that prints them"
    if calling is not None and not printing.calls:
        raise TemplateRowError(
            f"{calling}: an assistant turn calls tools (tool_calls), but the chat template does not print tool "
            f"calls, so the call would train as an empty reply; {fix}, or leave the tool-calling rows out"
        )
    if answered is not None and not printing.results:
        raise TemplateRowError(
            f"{answered}: the conversation holds tool results (role tool), but the chat template does not print "
            f"them, so the reply after one would train without what it answers; {fix}, or leave those rows out"
        )
    if described is not None and not printing.definitions:
        raise TemplateRowError(
            f"{described}: the row describes tools ('tools'), but the chat template does not print tool "
            "definitions, so the model would learn to call tools it is never shown; describe them in the system "
            f"message instead, or {fix}"
        )


def encode(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    origins: list[str],
    fold_system: bool = False,
    template_vars: dict | None = None,
    workers: int = 1,
    loss_on: str = "replies",
) -> Encoded:
    """Tokenize and mask every row, collecting what the checks need; `template_vars`: what the chat template sees
    beside each conversation (see `template_vars`). `workers` > 1: in that many processes, each taking a run of
    rows in turn (rendering the template is Python, one core a process); the result is the same. `loss_on` "all":
    every token carries loss (data.loss_on), the replies' terminators still found for the checks."""
    template_vars = template_vars or {}
    check_tool_rows(tokenizer, rows, origins)
    if workers > 1 and len(rows) > ENCODE_BATCH:
        return _encode_in_processes(tokenizer, rows, origins, fold_system, template_vars, workers, loss_on)
    examples, no_loss, all_loss, unterminated, terminators = TokenizedRows(), [], [], [], Counter()
    for start in range(0, len(rows), ENCODE_BATCH):
        chunk = list(zip(rows[start : start + ENCODE_BATCH], origins[start : start + ENCODE_BATCH], strict=True))
        prepared = [_prepare(tokenizer, row, where, fold_system, template_vars) for row, where in chunk]
        for tok, (row, where) in zip(_tokenized(tokenizer, prepared), chunk, strict=True):
            if loss_on == "all":
                tok.loss_mask = [1] * len(tok.input_ids)
            if not any(tok.loss_mask) and not row.get("sample"):  # a sampled prompt supervises nothing
                no_loss.append(where)
            elif "text" not in row and loss_on != "all" and all(tok.loss_mask):
                all_loss.append(where)
            if tok.unterminated:
                unterminated.append(where)
            terminators.update(tok.terminators)
            examples.append(tok)
    sampled = bool(rows) and all(row.get("sample") for row in rows)
    return Encoded(examples, origins, no_loss, all_loss, unterminated, terminators, sampled)


def _encode_in_processes(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    origins: list[str],
    fold_system: bool,
    template_vars: dict,
    workers: int,
    loss_on: str,
) -> Encoded:
    """`encode` over runs of rows in `workers` fresh processes (spawned: a forked copy of a process that has
    started threads, torch's or the tokenizer's, can hang), joined in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = max(ENCODE_BATCH, -(-len(rows) // (workers * 4)))  # a few runs a process, so none waits on the last
    runs = [(rows[a : a + size], origins[a : a + size]) for a in range(0, len(rows), size)]
    context = multiprocessing.get_context("spawn")
    settings = (tokenizer, fold_system, template_vars, loss_on)
    with ProcessPoolExecutor(workers, context, _start_encoder, settings) as pool:
        parts = list(pool.map(_encode_run, runs))
    out = parts[0]
    for part in parts[1:]:
        out.examples.extend(part.examples)
        out.no_loss += part.no_loss
        out.all_loss += part.all_loss
        out.unterminated += part.unterminated
        out.terminators.update(part.terminators)
    out.origins = origins
    return out


_ENCODER: tuple = ()  # in an encoding process: the tokenizer and settings `encode` runs with


def _start_encoder(tokenizer: PreTrainedTokenizerBase, fold_system: bool, template_vars: dict, loss_on: str) -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core a process: the processes are the parallelism
    global _ENCODER
    _ENCODER = (tokenizer, fold_system, template_vars, loss_on)


def _encode_run(run: tuple[list[dict], list[str]]) -> Encoded:
    tokenizer, fold_system, template_vars, loss_on = _ENCODER
    return encode(tokenizer, run[0], run[1], fold_system, template_vars, loss_on=loss_on)


def choose_pad(tokenizer: PreTrainedTokenizerBase, terminators: set[int]) -> tuple[str, str]:
    """Set a pad token if the tokenizer has none; returns (token, why).

    The pad must not be a turn terminator or EOS: collators that mask labels by pad id (Transformers'
    own DataCollatorForLanguageModeling does) would hide exactly the token that teaches the model to stop.
    """
    if tokenizer.pad_token is not None:
        return tokenizer.pad_token, "the tokenizer's own"
    avoid = terminators | {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    candidates = [t for t in PAD_CANDIDATES if t in vocab]
    candidates += sorted(
        (t.content for i, t in tokenizer.added_tokens_decoder.items() if "reserved" in t.content),
        key=lambda t: vocab.get(t, 0),
    )
    for token in candidates:
        if vocab[token] not in avoid:
            tokenizer.pad_token = token
            return token, "chosen by tunelab: the tokenizer has no pad token"
    raise ConfigError(
        "tokenizer.pad_token: the tokenizer has no pad token and none of its tokens is a safe choice "
        "(padding with EOS or the turn terminator would hide it from the loss); set tokenizer.pad_token to an "
        "unused token of its vocabulary"
    )


@dataclass
class TokenChecks:
    """What `plan` shows and the manifest records about tokens: terminator, pad, rows the loss misses."""

    terminator: str | None  # the special token that closes supervised spans (the most common one)
    terminator_is_eos: bool
    pad_token: str
    pad_source: str
    rows_without_loss: list[str]  # rows with no supervised token after truncation: the trainer drops them
    rows_all_loss: list[str]  # chat rows supervised on every token
    rows_unterminated: list[str]  # rows with a supervised span that no special token closes
    masking_template: str | None = None  # TRL's training version the masks come from, when it stands in
    reads_clock: bool = False  # the template writes today's date into the conversations (see reads_the_clock)

    def warnings(self, max_length: int, read: int | None = None) -> list[str]:
        """`read`: the rows the checks read, where that is not every row (plan reads a part of a large split,
        spread over it): the counts are of those."""
        out = []
        of = f" of the {read:,} rows plan read" if read is not None else ""
        if self.rows_without_loss:
            share = f" ({len(self.rows_without_loss) / read:.0%} of them)" if read is not None else ""
            out.append(
                f"{len(self.rows_without_loss)} rows{of}{share} carry no loss within train.max_length={max_length} and "
                f"will be dropped ({_some(self.rows_without_loss)}); raise train.max_length or fix those rows"
            )
        if self.rows_all_loss:
            out.append(
                f"{len(self.rows_all_loss)} chat rows{of} carry loss on every token, prompt included "
                f"({_some(self.rows_all_loss)}); check the chat template"
            )
        if self.rows_unterminated:
            out.append(
                f"{len(self.rows_unterminated)} rows{of} have assistant turns that no special token closes "
                f"({_some(self.rows_unterminated)}), so the model may not learn to stop; use a template that ends "
                "each turn with a special token (tokenizer.chat_template)"
            )
        if self.reads_clock:
            out.append(
                "the chat template writes today's date into the conversations (strftime_now), so this experiment "
                "renders other tokens on another day; pass the template's date variable in tokenizer.template_vars, "
                "or set tokenizer.chat_template to a copy with a fixed date"
            )
        return out

    def record(self) -> dict:
        """The manifest's copy: counts, and the first few places of each kind."""
        out = {"terminator": self.terminator, "terminator_is_eos": self.terminator_is_eos}
        out |= {"pad_token": self.pad_token, "pad_source": self.pad_source, "masking_template": self.masking_template}
        out["reads_clock"] = self.reads_clock
        for name in ("rows_without_loss", "rows_all_loss", "rows_unterminated"):
            wheres = getattr(self, name)
            out[name] = {"count": len(wheres), "first": wheres[:10]}
        return out


def _some(wheres: list[str]) -> str:
    return ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")


def check_tokens(tokenizer: PreTrainedTokenizerBase, splits: list[Encoded], max_length: int) -> TokenChecks:
    """Run the checks over encoded splits and give the tokenizer a safe pad token if it has none."""
    counts: Counter = Counter()
    for enc in splits:
        counts.update(enc.terminators)
    terminator_id = counts.most_common(1)[0][0] if counts else None
    pad, pad_source = choose_pad(tokenizer, set(counts))
    return TokenChecks(
        terminator=tokenizer.convert_ids_to_tokens(terminator_id) if terminator_id is not None else None,
        terminator_is_eos=terminator_id is not None and terminator_id == tokenizer.eos_token_id,
        pad_token=pad,
        pad_source=pad_source,
        rows_without_loss=[w for enc in splits for w in enc.no_loss_after(max_length)],
        rows_all_loss=[w for enc in splits for w in enc.all_loss],
        rows_unterminated=[w for enc in splits for w in enc.unterminated],
        masking_template=masking_template(tokenizer)[1] if tokenizer.chat_template else None,
    )


def fold_preference(row: dict, fold_system: bool) -> dict:
    """A preference pair with its prompt's system message folded, as the SFT rows are."""
    if fold_system and isinstance(row.get("prompt"), list):
        return {**row, "prompt": prepare_messages(row["prompt"], True)}
    return row


def preference_as_template_reads(row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    """A preference or KTO row for a trainer that renders it through the tokenizer's template itself (TRL's): its
    conversations' contents in the form the template prints (`as_template_reads`)."""
    template = tokenizer.get_chat_template(tools=row.get("tools")) if tokenizer.chat_template else None
    if template is None or not reads_text_parts(template, tokenizer):
        return row
    turns = ("prompt", "chosen", "rejected", "completion")
    return {k: text_parts(v) if k in turns and isinstance(v, list) else v for k, v in row.items()}


def stop_token_ids(configured: int | list[int] | None, extra: list[int | None]) -> list[int]:
    """The ids a reply ends at: a generation config's eos_token_id (an int, a list or None) followed by the
    ones in `extra` it lacks (the tokenizer's EOS, a run's turn terminator)."""
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return ids + [i for i in dict.fromkeys(extra) if i is not None and i not in ids]


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


def added_ids_used(tokenizer: PreTrainedTokenizerBase, encoded: list[Encoded]) -> set[int]:
    """The tokenizer's special and added tokens that occur in the tokenized data (a chat template's markers)."""
    special = special_ids(tokenizer) | set(tokenizer.added_tokens_decoder)
    import numpy as np

    used = {int(i) for split in encoded for i in np.unique(split.examples.columns()[0])}
    return used & special
