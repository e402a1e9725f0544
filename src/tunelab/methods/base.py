"""What every training objective provides, and what it is given.

A method is one module under `tunelab/methods/` that defines `METHOD = Method(...)`, registered by name
in `tunelab/methods/__init__.py`. It owns the data it takes, whether it keeps a reference model, how its
TRL trainer is built and whether held-out preference pairs measure it. docs/adding-a-method.md walks
through adding one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from tunelab.config import Experiment
    from tunelab.data import Splits
    from tunelab.methods.common import Hardware
    from tunelab.templates import Encoded


@dataclass
class TrainerInputs:
    """Everything a method needs to build its trainer, prepared once by `train`."""

    exp: Experiment
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    splits: Splits
    encoded: list[Encoded]  # train (and eval) as `plan` showed them
    hw: Hardware
    output_dir: Path
    callbacks: list[TrainerCallback]
    reference: str | None  # for methods with a reference model: "adapter", "copy" or "precomputed"
    ref_cache: Path | None  # where precomputed reference log-probs are kept, if the method caches them
    also: dict[str, Encoded] = field(default_factory=dict)  # data.eval_also's sets (SFT), tokenized


@dataclass(frozen=True)
class Method:
    name: str
    formats: tuple[str, ...]  # data formats it trains on (see tunelab.data.FORMAT_FIELDS)
    sequences: int  # forward sequences per example: 1, or 2 (chosen and rejected; KTO's completion and KL sample)
    # Keeps a reference model (live or precomputed), counted by plan's memory estimate; or which experiments do.
    reference: bool | Callable[[Experiment], bool]
    padding_free: bool  # its trainer takes tunelab's padding-free batches
    build: Callable[[TrainerInputs], Trainer]
    settings: Callable[[Experiment], Any] = lambda exp: None  # its section of the experiment, if any
    caches_reference: bool = False  # precomputed reference log-probs are kept across runs (TrainerInputs.ref_cache)
    # Its trainer scores tokens through TRL's fused LM head (trl.trainer.utils.add_fused_lm_head), in tiles, never
    # holding a forward pass's logits: plan's memory estimate counts one tile instead.
    fused_head: bool = False
    # Its trainer samples a step's replies itself before training on them (GRPO, distill): plan counts their KV cache.
    generates: bool = False
    # Training sequences each data row becomes in an epoch (GRPO: the completions sampled for each prompt); plan
    # counts optimizer steps from them, and train.batch_size counts them.
    samples: Callable[[Experiment], int] = lambda exp: 1
    # The held-out measure the Trainer logs as eval_<name>, which train.keep: best and early_stop compare: "loss"
    # (lower is better) or "reward" (GRPO's mean reward of completions sampled for the eval prompts; higher).
    held_out: str = "loss"
    # Refusals that need the data as tokenized (GRPO: prompts that leave no room for a completion), or the tokenizer
    # (GRPO's tools: a template that prints them; None where plan has no tokenizer), for plan and train.
    check_data: Callable[[Experiment, list[Encoded], PreTrainedTokenizerBase | None], None] = (
        lambda exp, encoded, tokenizer: None
    )
    # A line for plan on what its own settings decide, if they decide more than its section shows (GRPO: sampling).
    describe: Callable[[Experiment], str | None] = lambda exp: None
    # Measures its held-out pairs itself, on the trainer's own batches (reward: the chosen answer scored above the
    # rejected one), where the others compare log-probabilities of the answers (preference.preference_accuracy).
    pair_accuracy: Callable[[Trainer], float | None] | None = None
    # Its TRL trainer adds a mixture-of-experts model's router load-balancing loss to the loss it trains and
    # evaluates on (its config's router_aux_loss_coef, which train.router_aux_loss sets).
    router_aux_loss: bool = False

    def keeps_reference(self, exp: Experiment) -> bool:
        return self.reference(exp) if callable(self.reference) else self.reference

    @property
    def preference(self) -> bool:
        """Measured by preference accuracy on held-out pairs before and after training."""
        return "preference" in self.formats
