"""A reward model as a scorer of replies: compare's judge of every variant's outputs, and a reward GRPO trains with.

Two kinds are named the same way (`grpo.rewards`, compare's runs):
- a completed tunelab run of method: reward (`runs/rm`): its trained model, its tokenizer and chat template, the
  system message folded where the run folded it, plain-text pairs scored as text with the EOS appended;
- a published one, `model:<hub id or folder>` (Skywork/Skywork-Reward-V2-Llama-3.1-8B, an exported run): a
  ...ForSequenceClassification checkpoint with one label, scored through its own tokenizer and chat template.

Either scores a prompt and a reply as TRL's RewardTrainer scored a pair's answer: prompt + reply rendered whole by
apply_chat_template, the score read at the last token that is not padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import ModelSettings, Quantization, TokenizerSettings, model_head
from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

MODEL_PREFIX = "model:"  # a published reward model: model:<hub id or folder>


def is_reward_run(path: str | Path) -> bool:
    """A tunelab run folder whose method trains a reward model (any status)."""
    from tunelab.runs import read_manifest, run_status

    return run_status(Path(path)) is not None and model_head(read_manifest(Path(path)).method or "") == "score"


def is_reward_model(spec: str | Path) -> bool:
    """A reward model named as compare and grpo.rewards name one: a reward run's folder, or model:<id>."""
    return str(spec).startswith(MODEL_PREFIX) or is_reward_run(spec)


def published_settings(spec: str, quantization: Quantization | None = None) -> ModelSettings:
    """How a published reward model (model:<hub id or folder>) loads: as its checkpoint says, dtype by the device,
    its linear weights quantized where `quantization` says (grpo.reward_quantization)."""
    return ModelSettings(id=spec.removeprefix(MODEL_PREFIX), quantization=quantization)


def published_config(spec: str, key: str) -> PretrainedConfig:
    """A published reward model's config, checked: a sequence-classification checkpoint with one label. Refusals
    name `key` (where the experiment or the command line named it)."""
    from tunelab.models import load_config

    settings = published_settings(spec)
    try:
        config = load_config(settings)
    except ConfigError as e:
        raise ConfigError(f"{key}: {str(e).removeprefix('model.id: ')}") from e
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        named = ", ".join(architectures) or "no architecture"
        raise ConfigError(
            f"{key}: '{settings.id}' is not a reward model: its config.json names {named}; a reward model is a "
            "...ForSequenceClassification checkpoint with one label"
        )
    if getattr(config, "num_labels", 1) != 1:
        raise ConfigError(
            f"{key}: '{settings.id}' scores {config.num_labels} labels; a reward model gives one score (num_labels 1)"
        )
    return config


@dataclass
class RewardModel:
    """Scores replies with a reward model, loaded on first use; called as TRL calls a reward function."""

    spec: str  # a reward run's folder, or model:<hub id or folder>
    device: str | None = None  # where it runs: by default the device its settings pick here
    quantization: Quantization | None = None  # a published one's, loaded quantized (a run loads as it trained)
    batch_size: int = 16
    # the model (frozen, eval mode), its tokenizer, its template settings, and whether it scores plain text
    loaded: tuple[Any, Any, TokenizerSettings, bool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.spec = str(self.spec)

    @property
    def __name__(self) -> str:  # TRL logs each reward function's mean under its __name__
        return Path(self.spec.removeprefix(MODEL_PREFIX)).name

    def load(self) -> tuple[Any, Any, TokenizerSettings, bool]:
        if self.loaded is None:
            import torch

            # Loaded on first use, which may be mid-training: a new head's random init must not move the random state
            # the policy samples from (a resumed run loads it at another step than the run it continues).
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                published = self.spec.startswith(MODEL_PREFIX)
                model, tokenizer, template, text = self._published() if published else self._run()
            for p in model.parameters():
                p.requires_grad_(False)
            # The score is read at each sequence's last token before padding, found by the pad id.
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model.config.pad_token_id = tokenizer.pad_token_id
            self.loaded = (model.eval(), tokenizer, template, text)
        return self.loaded

    def _run(self) -> tuple[Any, Any, TokenizerSettings, bool]:
        from tunelab.models import auto_tokenizer, pick_device
        from tunelab.runs import TOKENIZER, load_run_experiment, read_manifest
        from tunelab.scopes import load_trained

        run = Path(self.spec)
        manifest, exp = read_manifest(run), load_run_experiment(run)
        model = load_trained(run, self.device or pick_device(exp.model.device))
        text = manifest.data is not None and manifest.data.rendered == "text"
        return model, auto_tokenizer(run / TOKENIZER), exp.tokenizer, text

    def _published(self) -> tuple[Any, Any, TokenizerSettings, bool]:
        from tunelab.models import auto_tokenizer, load_model, pick_device, pick_dtype, weights_path

        settings = published_settings(self.spec, self.quantization)
        device = self.device or pick_device(settings.device)
        model = load_model(settings, pick_dtype(settings.dtype, device), device, head="score")
        return model, auto_tokenizer(weights_path(settings)), TokenizerSettings(), False

    def encode(self, prompt: str | list[dict], reply: str | list[dict], tools: list[dict] | None = None) -> list[int]:
        """The tokens of one prompt and reply (with the tool definitions the conversation was shown), as the reward
        trainer tokenized a pair's answer."""
        from tunelab.templates import fold_preference, preference_as_template_reads, template_vars

        _, tokenizer, template, text = self.loaded or self.load()
        if text and isinstance(prompt, str) and isinstance(reply, str):
            eos = tokenizer.eos_token or ""
            return list(tokenizer(prompt + (reply if reply.endswith(eos) else reply + eos))["input_ids"])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        pair = fold_preference({"prompt": prompt, "chosen": reply, "tools": tools}, template.fold_system)
        row = preference_as_template_reads(pair, tokenizer)
        variables = template_vars(template, tokenizer)
        chat = row["prompt"] + row["chosen"]
        encoded = tokenizer.apply_chat_template(chat, tools=tools, tokenize=True, return_dict=True, **variables)
        return list(encoded["input_ids"])

    def score(self, sequences: list[list[int]]) -> list[float]:
        import torch

        model, tokenizer, _, _ = self.loaded or self.load()
        device = next(model.parameters()).device
        out: list[float] = []
        for start in range(0, len(sequences), self.batch_size):
            batch = tokenizer.pad({"input_ids": sequences[start : start + self.batch_size]}, return_tensors="pt")
            with torch.no_grad():
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                out += model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts: list, completions: list, tools: list | None = None, **kwargs) -> list[float]:
        """Scores, as GRPO calls a reward function (a row's other fields as keyword lists: `tools`, each row's tool
        definitions, is printed into its conversation)."""
        tools = tools or [None] * len(prompts)
        return self.score([self.encode(*args) for args in zip(prompts, completions, tools, strict=True)])
