"""A trained reward model (a completed run of method: reward) as a scorer of replies: compare's judge of every
variant's outputs, and a reward GRPO trains with (`grpo.rewards: [runs/reward]`).

It scores a prompt and a reply as its trainer scored a pair's answers: the conversation rendered by the run's own
tokenizer and chat template (TRL's RewardTrainer renders prompt + answer with apply_chat_template), the system
message folded where the run folded it, and plain-text pairs as text with the EOS appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import model_head

if TYPE_CHECKING:
    from tunelab.config import Experiment


def is_reward_run(path: str | Path) -> bool:
    """A tunelab run folder whose method trains a reward model (any status)."""
    from tunelab.runs import read_manifest, run_status

    return run_status(Path(path)) is not None and model_head(read_manifest(Path(path)).method or "") == "score"


@dataclass
class RewardModel:
    """Scores replies with a reward run's model, loaded on first use; called as TRL calls a reward function."""

    run: Path
    device: str | None = None  # where it runs: by default the device the run's settings pick here
    batch_size: int = 16
    loaded: tuple[Any, Any, Experiment, bool] | None = field(default=None, repr=False)

    @property
    def __name__(self) -> str:  # TRL logs each reward function's mean under its __name__
        return self.run.name

    def load(self) -> tuple[Any, Any, Experiment, bool]:
        """The trained model (frozen, eval mode), its tokenizer, the run's experiment, and whether it scored text."""
        if self.loaded is None:
            from tunelab.models import auto_tokenizer
            from tunelab.runs import TOKENIZER, load_run_experiment, read_manifest
            from tunelab.scopes import load_trained

            manifest = read_manifest(self.run)
            model = load_trained(self.run, self.device or _device(self.run)).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            tokenizer = auto_tokenizer(self.run / TOKENIZER)
            # The score is read at each sequence's last token before padding, found by the pad id it trained with.
            model.config.pad_token_id = tokenizer.pad_token_id
            text = manifest.data is not None and manifest.data.rendered == "text"
            self.loaded = (model, tokenizer, load_run_experiment(self.run), text)
        return self.loaded

    def encode(self, prompt: str | list[dict], reply: str | list[dict]) -> list[int]:
        """The tokens of one prompt and reply, as the reward trainer tokenized a pair's answer."""
        from tunelab.templates import fold_preference, preference_as_template_reads, template_vars

        _, tokenizer, exp, text = self.loaded or self.load()
        if text and isinstance(prompt, str) and isinstance(reply, str):
            answer = reply if reply.endswith(tokenizer.eos_token or "") else reply + (tokenizer.eos_token or "")
            return list(tokenizer(prompt + answer)["input_ids"])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        row = preference_as_template_reads(
            fold_preference({"prompt": prompt, "chosen": reply}, exp.tokenizer.fold_system), tokenizer
        )
        variables = template_vars(exp.tokenizer, tokenizer)
        rendered = tokenizer.apply_chat_template(
            row["prompt"] + row["chosen"], tokenize=True, return_dict=True, **variables
        )
        return list(rendered["input_ids"])

    def score(self, sequences: list[list[int]]) -> list[float]:
        import torch

        model, tokenizer, _, _ = self.loaded or self.load()
        device = next(model.parameters()).device
        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = tokenizer.pad({"input_ids": sequences[start : start + self.batch_size]}, return_tensors="pt")
            with torch.no_grad():
                logits = model(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).logits
            out += logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        return self.score([self.encode(p, c) for p, c in zip(prompts, completions, strict=True)])


def _device(run: Path) -> str:
    from tunelab.models import pick_device
    from tunelab.runs import load_run_experiment

    return pick_device(load_run_experiment(run).model.device)
