"""Talk to one variant: a run on its base (or the base alone), asked turn after turn as compare asks it.

The model loads as compare loads it (the base once, the run's scope kind putting the run on it), with the tokenizer,
chat template variables and stop tokens the run trained with; each reply streams as it is generated and joins the
conversation the next turn is asked in. Decoding is greedy unless a temperature is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.compare import (
    GREEDY,
    Prompt,
    asks_in_chat,
    encode_prompts,
    generate,
    load_runs,
    stop_ids,
    tokenizer_folder,
)
from tunelab.config import ModelSettings, TokenizerSettings
from tunelab.errors import TunelabError
from tunelab.runs import load_run_experiment, run_status

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Chat:
    """A loaded variant and the conversation so far."""

    name: str  # what is asked: the run's name, or the base model's id
    model: object
    tokenizer: PreTrainedTokenizerBase
    decoding: dict
    template_vars: dict
    in_chat: bool  # asked through the chat template; False: a run trained on plain text, each prompt on its own
    max_new_tokens: int
    system: str | None = None
    fold_system: bool = False  # the run's tokenizer.fold_system: a system message goes into the first user turn
    turns: list[dict] = field(default_factory=list)

    def ask(self, text: str, streamer=None, say: Callable[[str], None] | None = None) -> str:
        """The variant's reply to `text` after the conversation so far (a plain-text variant: to `text` alone);
        `streamer` (Transformers' TextStreamer) is handed the reply's tokens as they come; `say` is told, before the
        reply comes, what the model's context left out of the conversation or of the reply."""
        from jinja2 import TemplateError

        turn = {"role": "user", "content": text}
        try:
            prompt, room = self._fitted(turn, say or (lambda _: None))
            reply = generate(
                self.model, self.tokenizer, [prompt], None, room, 1, self.decoding, self.template_vars, self.in_chat,
                streamer=streamer,
            )[0]  # fmt: skip
        except TemplateError as e:
            if self.system and self.in_chat and "system" in str(e).lower():
                raise TunelabError(f"--system: the chat template refuses a system message ({e}); leave it out") from e
            raise TunelabError(f"chat: the chat template refuses the conversation ({e})") from e
        if self.in_chat:
            self.turns = [*self.turns, turn, {"role": "assistant", "content": reply}]
        return reply

    def _fitted(self, turn: dict, say: Callable[[str], None]) -> tuple[Prompt, int]:
        """The prompt to ask `turn` in, and the most tokens its reply may have, within the positions the model reads:
        the oldest exchanges leave the conversation while it and a reply of max_new_tokens would outgrow them, and a
        reply that would still outgrow them is cut to the room left."""
        from tunelab.plan import position_limit
        from tunelab.templates import prepare_messages

        opening = [{"role": "system", "content": self.system}] if self.system and self.in_chat else []
        limit, _ = position_limit(self.model)
        dropped = 0
        while True:
            asked = [*self.turns, turn] if self.in_chat else [turn]
            prompt = Prompt(0, prepare_messages(opening + asked, self.fold_system))
            if limit is None:
                return prompt, self.max_new_tokens
            enc = encode_prompts(self.tokenizer, [prompt], "cpu", self.template_vars, self.in_chat)
            used = enc["input_ids"].shape[1]
            if used + self.max_new_tokens <= limit or not self.turns:
                break
            self.turns, dropped = self.turns[2:], dropped + 1  # a user turn and its reply
        if dropped:
            say(
                f"(the first {f'{dropped} exchanges' if dropped > 1 else 'exchange'} of this chat left out: with a "
                f"reply of up to {self.max_new_tokens} tokens, the chat no longer fits in the {limit} positions "
                f"{self.name} reads)"
            )
        if used >= limit:
            raise TunelabError(
                f"chat: this turn is {used} tokens as the template renders it, and {self.name} reads at most {limit}; "
                "ask a shorter one"
            )
        if used + self.max_new_tokens > limit:
            say(f"(this reply can be at most {limit - used} tokens: {self.name} reads {limit} positions)")
        return prompt, min(self.max_new_tokens, limit - used)

    def reset(self) -> None:
        self.turns = []


@contextmanager
def open_chat(
    target: str,
    base_only: bool = False,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[Chat]:
    """`target`: a run folder (a tunelab run, a run's checkpoint, or an adapter folder a PEFT script saved), or a base
    model (hub id, folder, builtin:<name>). `base_only`: a run's base without the run."""
    import torch

    from tunelab.models import auto_tokenizer
    from tunelab.scopes import BaseLoader, attach_runs, base_alone, checkpoint_views
    from tunelab.templates import template_vars

    with checkpoint_views([Path(target)]) as views:  # a run's checkpoint: a run of its own, RUN@STEP
        folder = next(iter(views), Path(target))
        _check_target(folder)
        runs = load_runs([folder], command="chat", elsewhere=True) if _is_run(folder) else []
        exp = load_run_experiment(folder) if runs and run_status(folder) is not None else None
        settings = exp.model if exp else ModelSettings(id=runs[0][1].base_model.id if runs else target)
        base = BaseLoader.pick(settings)
        torch.manual_seed(seed)
        model = base.load().eval()  # first: a base that is not here is named in one line by the loading
        tokenizer = auto_tokenizer(tokenizer_folder(folder, settings))
        tokenizer.padding_side = "left"
        manifests = [m for _, m in runs]
        decoding = GREEDY if temperature is None else {"do_sample": True, "temperature": temperature, "top_p": top_p}
        decoding = {**decoding, "eos_token_id": stop_ids(model, tokenizer, manifests)}
        variables = template_vars(exp.tokenizer if exp else TokenizerSettings(), tokenizer)
        name = manifests[0].name if runs and not base_only else settings.id
        in_chat = asks_in_chat(tokenizer, None if base_only or not runs else manifests[0])

        def chat(variant) -> Chat:
            fold = exp.tokenizer.fold_system if exp else False
            return Chat(name, variant, tokenizer, decoding, variables, in_chat, max_new_tokens, system, fold)

        if not runs:
            yield chat(model)
            return
        model, kinds = attach_runs(model, runs)
        if base_only:
            with base_alone(model):
                yield chat(model)
            return
        with kinds[manifests[0].name].active(model, folder, manifests[0].name, base) as variant:
            yield chat(variant)


def _is_run(folder: Path) -> bool:
    """A run folder, or a folder a plain script saved an adapter in; anything else names a base model."""
    from tunelab.scopes import made_elsewhere

    if not folder.is_dir():
        return False
    if run_status(folder) is not None:
        return True
    return made_elsewhere(folder) is not None


def _check_target(folder: Path) -> None:
    """A folder that is no run, adapter or model, or a path to none (a mistyped run), refused in one line."""
    if folder.is_dir() and not _is_run(folder) and not (folder / "config.json").is_file():
        raise TunelabError(
            f"chat: {folder} is a folder but neither a tunelab run, an adapter folder a script saved "
            "(adapter_config.json) nor a model folder (config.json); give one of those, or a model's hub id"
        )
    if not folder.exists() and folder.parent.is_dir() and str(folder.parent) != ".":
        held = sorted(p.name for p in folder.parent.iterdir() if p.is_dir() and _is_run(p))
        listing = f" (runs there: {', '.join(held[:8])}{', ...' if len(held) > 8 else ''})" if held else ""
        raise TunelabError(f"chat: {folder} does not exist{listing}")
