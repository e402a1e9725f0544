"""What the preference methods share: their batches, their rows, their reference model and their metric."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import TrainSettings
from tunelab.methods.common import Hardware, batching, training_arguments

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunelab.methods.base import TrainerInputs
    from tunelab.templates import Tokenized


def preference_arguments(
    train: TrainSettings, hw: Hardware, output_dir: Path, has_eval: bool, method: str, rows: int
) -> dict:
    """Arguments for pairwise trainers: random batches (TRL computes no length column for grouping pairs); `rows`
    of training data, which TRL tokenizes itself, in several processes where there are many (its
    dataset_num_proc, as tunelab tokenizes SFT data)."""
    from tunelab.inputs import data_workers

    args = training_arguments(train, hw, output_dir, has_eval, batching(train, method))
    args["train_sampling_strategy"] = "random"
    args["dataset_num_proc"] = data_workers(rows, train.data_workers)
    return args


def preference_rows(inputs: TrainerInputs) -> tuple[list[dict], list[dict] | None]:
    """The split's rows as the trainer takes them, with system messages folded where the experiment asks."""
    from tunelab.templates import fold_preference, preference_as_template_reads, template_vars

    fold, tokenizer = inputs.exp.tokenizer.fold_system, inputs.tokenizer
    # TRL renders the pairs itself, with each row's chat_template_kwargs.
    variables = {"chat_template_kwargs": template_vars(inputs.exp.tokenizer, tokenizer)}

    def rows(split) -> list[dict]:
        return [preference_as_template_reads(fold_preference(r, fold), tokenizer) | variables for r in split.rows]

    return rows(inputs.splits.train), rows(inputs.splits.eval) if inputs.splits.eval else None


def reference_free_trainer(inputs: TrainerInputs, config_class: type, trainer_class: type, **settings):
    """ORPO and SimPO: TRL's experimental pairwise trainers, with no reference model. Their batches carry only
    chosen_/rejected_input_ids, so the Trainer has no input tokens to count."""
    from tunelab.methods.common import instantiate, trl_config
    from tunelab.methods.sampling import seeded

    exp, tokenizer = inputs.exp, inputs.tokenizer
    terminator = reply_terminator(inputs)
    train_rows, eval_rows = (
        None if rows is None else [as_text_pair(r, tokenizer, terminator) for r in rows]
        for rows in preference_rows(inputs)
    )
    has_eval = eval_rows is not None
    args = preference_arguments(exp.train, inputs.hw, inputs.output_dir, has_eval, exp.method, len(train_rows))
    args["include_num_input_tokens_seen"] = "no"
    config = trl_config(config_class, **args, max_length=exp.train.max_length, **settings)
    chat = is_chat_pair(inputs.splits.train.rows[0])
    trainer_class = as_sft_tokenizes(seeded(trainer_class), terminator, chat)
    return instantiate(trainer_class, inputs.model, config, tokenizer, train_rows, eval_rows, inputs.callbacks)


def reply_terminator(inputs: TrainerInputs) -> str | None:
    """The special token that ends the training replies, as SFT found it in the pairs' chosen answers (Gemma's
    <end_of_turn>, ChatML's <|im_end|>), where the pairs are conversations; None for plain-text pairs."""
    counts = inputs.encoded[0].terminators if inputs.encoded else None
    if not counts or not is_chat_pair(inputs.splits.train.rows[0]):
        return None
    return inputs.tokenizer.convert_ids_to_tokens(counts.most_common(1)[0][0])


def is_chat_pair(row: dict) -> bool:
    from trl.data_utils import is_conversational

    return is_conversational(row)


def as_text_pair(row: dict, tokenizer: PreTrainedTokenizerBase, terminator: str | None) -> dict:
    """A conversational pair as ORPO's and SimPO's trainers are handed it: rendered to text by TRL's own
    `apply_chat_template`, as they would render it, but with the row's tools (they render without them), and each
    answer ending at the reply's `terminator` where the template follows it with whitespace and EOS alone (ChatML's
    "<|im_end|>\n", Gemma's "<end_of_turn>\n", Phi-3's "<|end|>\n<|endoftext|>"), as SFT supervises a reply."""
    from trl.data_utils import apply_chat_template

    if not is_chat_pair(row):
        return row
    text = apply_chat_template(row, tokenizer, tools=row.get("tools"))
    for answer in ("chosen", "rejected") if terminator else ():
        head, end, after = text[answer].rpartition(terminator)
        if tokenizer.eos_token:
            after = after.replace(tokenizer.eos_token, "")
        if end and not after.strip():
            text[answer] = head + end
    return text


def as_sft_tokenizes(trainer_class: type, terminator: str | None, chat: bool) -> type:
    """The pairwise trainer class (ORPO's, SimPO's) with each pair tokenized as SFT tokenizes it. TRL prepends BOS to
    every prompt that does not start with it, where SFT has the tokens the template prints (`chat`; Phi-3's and
    Zephyr's print none) or the tokenizer adds (plain text): Phi-3 trained `<s><|user|>`, which no prompt it is asked
    in generation starts with. And it appends EOS to every answer that does not end with it, where SFT ends a reply at
    its `terminator` (Gemma's <end_of_turn>, Phi-3's <|end|>): those trained `reply<end_of_turn><eos>`, a token after
    the one generation stops at. Each is dropped where TRL added it and SFT has none."""

    class AsSftTokenizes(trainer_class):
        def tokenize_row(self, feature: dict, *args, **kwargs) -> dict:
            batch = super().tokenize_row(feature, *args, **kwargs)
            tokenizer = self.processing_class
            bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            sft_prompt = tokenizer(feature["prompt"], add_special_tokens=not chat)["input_ids"]
            if bos is not None and batch["prompt_input_ids"][:1] == [bos] and sft_prompt[:1] != [bos]:
                for key in ("prompt_input_ids", "prompt_attention_mask"):
                    batch[key] = batch[key][1:]
                for key in ("input_ids", "attention_mask", "labels"):
                    for answer in ("chosen", "rejected"):
                        batch[f"{answer}_{key}"] = batch[f"{answer}_{key}"][1:]
            for answer in ("chosen", "rejected") if terminator and terminator != tokenizer.eos_token else ():
                ids = batch[f"{answer}_input_ids"]
                # the EOS TRL appended; an answer the length limit cut has lost it already
                if feature[answer].endswith(terminator) and ids[-1:] == [eos]:
                    for key in ("input_ids", "attention_mask", "labels"):
                        batch[f"{answer}_{key}"] = batch[f"{answer}_{key}"][:-1]
            return batch

    AsSftTokenizes.__name__ = AsSftTokenizes.__qualname__ = trainer_class.__name__
    return AsSftTokenizes


def reference_strategy(settings, adapter: bool) -> str:
    """'adapter' (the policy with its adapter disabled, or TRL's frozen adapter copy), 'copy' or 'precomputed'.

    `adapter`: the scope trains new parameters beside a frozen base (LoRA), so the base is the reference for free.
    """
    chosen = getattr(settings, "reference", "live")  # GRPO's reference is always live
    if chosen == "precomputed" or (chosen == "auto" and not adapter):
        return "precomputed"
    return "adapter" if adapter else "copy"


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    import copy

    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def answer_tokens(
    tokenizer: PreTrainedTokenizerBase,
    row: dict,
    answer: str,
    fold_system: bool = False,
    template_vars: dict | None = None,
) -> Tokenized:
    """A pair's prompt and one of its answers ("chosen" or "rejected") as preference accuracy scores them: rendered with
    the tool definitions the row's conversation was shown, the answer's tokens supervised."""
    from tunelab.templates import tokenize_example

    prompt, reply = row["prompt"], row[answer]
    if isinstance(reply, list) and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    pair = {"prompt": prompt, "completion": reply, "tools": row.get("tools")}
    return tokenize_example(tokenizer, pair, "pair", fold_system, template_vars)


def preference_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    fold_system: bool = False,
    template_vars: dict | None = None,
) -> float:
    """Share of pairs where the model gives the chosen answer a higher log-probability than the rejected one."""
    won = preference_wins(model, tokenizer, rows, fold_system, template_vars)
    return sum(won) / max(len(rows), 1)


def preference_wins(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    fold_system: bool = False,
    template_vars: dict | None = None,
) -> list[bool]:
    """Per pair, whether the model gives the chosen answer a higher log-probability than the rejected one."""
    import torch

    def logp(row: dict, answer: str) -> float:
        tok = answer_tokens(tokenizer, row, answer, fold_system, template_vars)
        ids = torch.tensor([tok.input_ids], device=model.device)
        mask = torch.tensor(tok.loss_mask[1:], device=model.device, dtype=torch.bool)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return token_logps[mask].sum().item()

    was_training = model.training
    model.eval()
    won = [logp(row, "chosen") > logp(row, "rejected") for row in rows]
    model.train(was_training)
    return won
