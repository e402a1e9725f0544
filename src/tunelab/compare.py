"""One base, many runs, the same prompts: outputs side by side, with the numbers.

The base loads once. Each run's scope kind (`tunelab.scopes`) says how it goes on that base: LoRA runs
attach as named adapters and generate together in mixed batches (PEFT's `adapter_names`, one adapter per
row, "__base__" for the base); partial runs swap their trained tensors onto the loaded base and back;
full runs load on their own. Decoding is greedy unless a temperature is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import DataSettings, Experiment, ModelSettings, Quantization, TokenizerSettings, model_head
from tunelab.data import Split, Splits, TrainingRows
from tunelab.errors import TunelabError
from tunelab.runs import (
    TOKENIZER,
    BaseModelRecord,
    Manifest,
    changed_sources,
    lm_eval_docs,
    lm_eval_scores,
    load_run_experiment,
    read_manifest,
    read_metrics,
    run_status,
    unfinished,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerBase

    from tunelab.teacher import Teacher

BASE = "__base__"
Rows = list[tuple[float, float]]  # a number measured row by row: what it is the ratio of, summed over the rows


@dataclass
class Prompt:
    id: int
    messages: list[dict]
    contains: list[str] = field(default_factory=list)
    not_contains: list[str] = field(default_factory=list)
    regex: list[str] = field(default_factory=list)
    reference: str | None = None
    fields: dict = field(default_factory=dict)  # the row's other fields, which GRPO's rewards read
    tools: list[dict] | None = None  # the tool definitions the chat template prints with the prompt
    # the instance of a GRPO run's environment (grpo.environment) this prompt is asked in: one per reply
    environment: object | None = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Variant:
    name: str
    kind: str  # base | lora | partial | full
    run_dir: str | None = None
    numbers: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)


@dataclass
class Check:
    kind: str
    expected: str
    passed: bool


@dataclass
class Comparison:
    base_model: str
    settings: dict
    variants: list[Variant]
    prompts: list[Prompt]
    outputs: dict[str, list[str]]  # variant name -> one output per prompt
    checks: dict[str, list[list[Check]]]
    # variant name -> per prompt, the messages of a reply that called tools (its calls, their results, its answer)
    exchanges: dict[str, list[list[dict] | None]] = field(default_factory=dict)
    # variant name -> measured quality -> per row of the rows every variant is measured on, what the number is the
    # ratio of summed over them: (loss, tokens) of a held-out chat, (won, 1) of a pair, and of a prompt (passed,
    # checks), (reward, 1), or (score, 1) against its reference ((0, 0) where it has none)
    per_row: dict[str, dict[str, Rows]] = field(default_factory=dict)

    def to_json(self) -> dict:
        extra = {"best": self.best(), "over_seeds": self.over_seeds(), "differences": self.differences()}
        return asdict(self) | extra

    def held_out_numbers(self) -> dict[str, dict[str, float | None]]:
        """Each variant's numbers but those measured on rows it trained on (settings' trained_on_numbers)."""
        touched = self.settings.get("trained_on_numbers") or {}
        return {v.name: {k: x for k, x in v.numbers.items() if k not in touched.get(v.name, [])} for v in self.variants}

    def lower_is_better(self, key: str) -> bool | None:
        """lower_is_better, and for an lm-eval score what lm-eval says of it (settings' lm_eval_higher_is_better)."""
        higher = (self.settings.get("lm_eval_higher_is_better") or {}).get(key)
        return lower_is_better(key) if higher is None else not higher

    def best(self) -> dict[str, list[str]]:
        """Per measured quality, the variants that do best (all of a tie): the lowest held-out losses, the highest
        pref acc, GRPO eval reward, expectation pass rate and reference scores, and lm-eval's scores as lm-eval ranks
        them. Only where at least two variants have the number, and never a number measured on rows the variant
        trained on (settings' trained_on_numbers)."""
        out, numbers = {}, self.held_out_numbers()
        for key in sorted({k for v in self.variants for k in v.numbers}):
            lower = self.lower_is_better(key)
            if lower is None:
                continue
            values = {name: n[key] for name, n in numbers.items() if n.get(key) is not None}
            if len(values) < 2:
                continue
            top = min(values.values()) if lower else max(values.values())
            out[key] = [name for name, value in values.items() if value == top]
        return out

    def differences(self) -> dict[str, dict]:
        """Per measured quality best() ranks, where the variants' numbers come from the same rows (per_row): how far
        each other variant is from the reference, the variant settings' `against` names or else the best one (the
        first of a tie), with a 95% interval from a paired bootstrap over those rows (every variant resampled by the
        same draws). An interval that holds 0 is a difference these rows cannot tell apart from their own noise; it
        says nothing of seed-to-seed spread (over_seeds). A quality the reference has no number of is left out."""
        numbers, out = self.held_out_numbers(), {}
        for key, leaders in self.best().items():
            measured = {
                name: rows[key]
                for name, rows in self.per_row.items()
                if key in rows and numbers.get(name, {}).get(key) is not None
            }
            reference = self.settings.get("against") or leaders[0]
            if reference not in measured or len(measured) < 2:
                continue
            against = paired_differences(measured, reference)
            rows = sum(1 for _, weight in measured[reference] if weight)  # a prompt without expectations: none
            out[key] = {"reference": reference, "best": leaders, "rows": rows, "against": against}
        return out

    def over_seeds(self) -> dict[str, dict]:
        """Per group of runs that repeat one experiment with other seeds (settings' replicates): the runs, and per
        measured quality (those best() ranks, and lm-eval scores) that at least two of them have, the mean and the
        sample standard deviation over them; as in best(), never a number measured on rows the run trained on (a
        seed's eval_fraction holds out rows another seed trains on)."""
        numbers = self.held_out_numbers()
        out = {}
        for label, names in (self.settings.get("replicates") or {}).items():
            keys = sorted({k for n in names for k in numbers[n]})
            stats = {}
            for key in keys:
                if lower_is_better(key) is None and not key.startswith(LM_EVAL_PREFIX):
                    continue
                values = [numbers[n][key] for n in names if isinstance(numbers[n].get(key), int | float)]
                if len(values) >= 2:
                    stats[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "n": len(values)}
            out[label] = {"runs": names, "numbers": stats}
        return out

    def trained_on_note(self) -> str | None:
        """The variants that trained on rows every variant is measured on, and those whose training rows could not be
        checked; None where neither."""
        seen, unchecked = self.settings.get("trained_on") or {}, self.settings.get("trained_on_unchecked") or {}
        said = []
        if seen:
            listing = "; ".join(f"{name}: {counts}" for name, counts in seen.items())
            said.append(
                f"trained on what they are measured on (the same rows, or rows that ask the same): {listing}. "
                "Their numbers there are partly recall, and not marked best; measure every variant on rows none "
                "trained on (one data.eval file, or --eval FILE)"
            )
        if unchecked:
            listing = "; ".join(f"{name}: {why}" for name, why in unchecked.items())
            said.append(f"not checked for training rows among those measured on: {listing}")
        return "\n".join(said) or None


RESAMPLES = 2000  # the paired bootstrap's draws: the interval's ends move by about 0.01 of its width between seeds


def ratio(rows: Rows) -> float | None:
    """A number measured over rows: the sum of their first parts over the sum of their second (None where that is
    0: no token, pair or check to measure)."""
    weight = sum(w for _, w in rows)
    return sum(x for x, _ in rows) / weight if weight else None


def paired_differences(
    measured: dict[str, Rows], reference: str, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each variant's number (a ratio over the same rows, in `measured`) minus the reference's, and the 2.5th and
    97.5th percentiles of that difference over `resamples` draws of the rows with replacement, one draw for all
    variants at once (a paired bootstrap); seeded, so a report says the same each time. Kept for the same input: a
    report asks it once for each file it writes, and 10,000 rows of 10 variants take seconds."""
    frozen = tuple((name, tuple(map(tuple, rows))) for name, rows in measured.items())
    return {name: dict(found) for name, found in _paired_differences(frozen, reference, resamples, seed).items()}


@functools.lru_cache(maxsize=64)
def _paired_differences(
    measured: tuple[tuple[str, tuple[tuple[float, float], ...]], ...], reference: str, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    import numpy as np

    names = [name for name, _ in measured]
    values = np.array([[x for x, _ in rows] for _, rows in measured], dtype=np.float64)  # (variants, rows)
    weights = np.array([[w for _, w in rows] for _, rows in measured], dtype=np.float64)
    rows, ref = values.shape[1], names.index(reference)
    rng, drawn = np.random.default_rng(seed), []
    for start in range(0, resamples, 250):  # 250 draws at a time: (250, rows) counts, whatever the rows
        counts = rng.multinomial(rows, np.full(rows, 1 / rows), size=min(250, resamples - start)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = (counts @ values.T) / (counts @ weights.T)  # (draws, variants)
        drawn.append(stats - stats[:, [ref]])
    spread = np.concatenate(drawn)
    point = values.sum(1) / weights.sum(1)
    out = {}
    for i, name in enumerate(names):
        if i != ref:
            low, high = np.nanpercentile(spread[:, i], [2.5, 97.5])
            out[name] = {"difference": float(point[i] - point[ref]), "low": float(low), "high": float(high)}
    return out


def lower_is_better(key: str) -> bool | None:
    """For a measured quality: True for the held-out losses, False for pref acc, GRPO eval reward, reward, the
    expectation pass rate and the reference scores; None for what is not one (counts, times, settings)."""
    if key == "eval_loss" or re.fullmatch(r"eval_[a-z0-9_]+_loss", key):
        return True
    if key in ("preference_accuracy", "expectation_pass_rate", "eval_reward", "reward", *REFERENCE_SCORES):
        return False
    return None


def replicates(runs: list[tuple[Path, Manifest]]) -> dict[str, list[str]]:
    """The tunelab runs that repeat one experiment with other seeds (replicate_key), each group of two or more under
    a label: their names without the -seed_<value> a study's grid gives them (and a study's hash after it) where that
    leaves one name, else the first name and how many more."""
    keys: dict[Path, str] = {}
    groups: dict[str, list[str]] = {}
    for run_dir, manifest in runs:
        if run_status(run_dir) is not None:
            groups.setdefault(replicate_key(run_dir, keys), []).append(manifest.name)
    out = {}
    for names in (names for names in groups.values() if len(names) > 1):
        stems = {re.sub(r"-[0-9a-f]{8}$", "", re.sub(r"-seed_[^-]+", "", name)) for name in names}  # a study's hash
        out[stems.pop() if len(stems) == 1 else f"{names[0]} and {len(names) - 1} more"] = names
    return out


def replicate_key(run_dir: Path, keys: dict[Path, str]) -> str:
    """A digest of a run's recorded experiment with train.seed, its name and output aside, and each run it builds on
    by that run's own key: the run it went on from (init_from), its teacher (distill.teacher) and its reward models
    (grpo.rewards). Equal for runs of one experiment, or one chain of them (SFT, then DPO after it; a teacher, then
    the student it taught), under other seeds. `keys`: those already worked out."""
    if run_dir not in keys:
        settings = load_run_experiment(run_dir).model_dump(mode="json")
        for name in ("name", "output"):
            settings.pop(name)
        settings["train"].pop("seed")
        settings["init_from"] = _run_or_value(settings.get("init_from"), keys)
        if settings.get("distill"):
            settings["distill"]["teacher"] = _run_or_value(settings["distill"]["teacher"], keys)
        if settings.get("grpo"):
            settings["grpo"]["rewards"] = [_run_or_value(reward, keys) for reward in settings["grpo"]["rewards"]]
        keys[run_dir] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return keys[run_dir]


def _run_or_value(value: str | None, keys: dict[Path, str]) -> str | None:
    """A recorded setting that names a tunelab run as that run's replicate_key; anything else as it is."""
    if value is None or run_status(Path(value)) is None:
        return value
    return "run " + replicate_key(Path(value), keys)


# ---------------------------------------------------------------- inputs


EXPECTATIONS = ("contains", "not_contains", "regex")


def _expectations(row: dict, where: str) -> dict:
    out = {}
    for key in EXPECTATIONS:
        value = row.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TunelabError(f"{where}: '{key}' must be a string or a list of strings")
        if key == "regex":
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise TunelabError(f"{where}: regex {pattern!r} is invalid ({e})") from e
        out[key] = value
    return out


def read_prompts(path: Path) -> list[Prompt]:
    from tunelab.data import read_records, row_tools

    prompts = []
    records, _ = read_records(str(path), "--prompts")
    for i, record in enumerate(records):
        row = record.value
        if not isinstance(row, dict):
            raise TunelabError(f"{record.where}: a prompt must be a JSON object")
        if isinstance(row.get("messages"), list):
            messages = row["messages"]
        elif isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise TunelabError(f"{record.where}: a prompt needs 'prompt' (a string) or 'messages' (a list)")
        fields = {k: v for k, v in row.items() if k not in ("prompt", "messages", "tools", *EXPECTATIONS)}
        expected = _expectations(row, record.where)
        reference = row.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise TunelabError(f"{record.where}: 'reference' must be a string, the answer the reply is scored against")
        prompt = Prompt(i, messages, **expected, reference=reference, fields=fields, tools=row_tools(record))
        prompts.append(prompt)
    if not prompts:
        raise TunelabError(f"{path}: no prompts")
    return prompts


PROMPTS = 32  # prompts compare takes from held-out data


def held_out_prompts(rows: list[dict], limit: int = PROMPTS) -> list[Prompt]:
    """Prompts from held-out data: the conversation up to its last assistant reply, which becomes the reference,
    with the row's tools."""
    prompts = []
    for row in rows[:limit]:
        tools = row.get("tools")
        if "messages" in row:
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            reference = row["messages"][last]["content"]
            prompts.append(Prompt(len(prompts), row["messages"][:last], reference=reference, tools=tools))
        elif isinstance(row.get("prompt"), list):
            answer = row.get("chosen") or row.get("completion")
            ref = answer[-1]["content"] if isinstance(answer, list) else answer
            fields = {k: v for k, v in row.items() if k not in ("prompt", "tools")}
            prompts.append(Prompt(len(prompts), row["prompt"], reference=ref, fields=fields, tools=tools))
        elif isinstance(row.get("prompt"), str):
            answer = row.get("chosen") or row.get("completion")
            fields = {k: v for k, v in row.items() if k != "prompt"}
            messages = [{"role": "user", "content": row["prompt"]}]
            prompts.append(Prompt(len(prompts), messages, reference=answer, fields=fields))
    if not prompts:
        raise TunelabError("compare: the runs' held-out data holds no prompts; pass --prompts FILE")
    return prompts


REFERENCE_SCORES = ("reference_f1", "exact_match")  # of an output against its prompt's reference: reference_scores
ARTICLES = re.compile(r"\b(a|an|the)\b")
# Scripts written without spaces between words (Chinese, Japanese kana): each character counts as a word, as
# MLQA's evaluation segments Chinese; otherwise a whole sentence would be one word, scored all or nothing.
UNSPACED = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])")


def answer_words(text: str) -> list[str]:
    """The words an answer is scored by, normalised as SQuAD's official evaluation script does: lower case,
    punctuation removed (here every Unicode punctuation character, not ASCII's alone), English articles removed,
    split on whitespace, and each Chinese or Japanese character a word of its own (UNSPACED)."""
    kept = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return UNSPACED.sub(r" \1 ", ARTICLES.sub(" ", kept)).split()


def reference_scores(output: str, reference: str) -> dict[str, float]:
    """An output against its reference answer, as SQuAD scores an answer: `exact_match` 1.0 where their words
    (answer_words) are the same, and `reference_f1` the F1 of the words they share (counted with repeats)."""
    said, wanted = answer_words(output), answer_words(reference)
    shared = sum((Counter(said) & Counter(wanted)).values())
    if not said or not wanted:
        f1 = float(said == wanted)
    else:
        f1 = 2 * shared / (len(said) + len(wanted))  # 2PR / (P + R), with P = shared/said and R = shared/wanted
    return {"reference_f1": f1, "exact_match": float(said == wanted)}


def check_output(prompt: Prompt, output: str) -> list[Check]:
    checks = [Check("contains", s, s.lower() in output.lower()) for s in prompt.contains]
    checks += [Check("not_contains", s, s.lower() not in output.lower()) for s in prompt.not_contains]
    checks += [Check("regex", p, re.search(p, output) is not None) for p in prompt.regex]
    return checks


LM_EVAL_PREFIX = "lm_eval:"  # numbers from a run's stored lm-eval scores (`tunelab eval`)


def load_runs(
    run_dirs: list[Path], mixed_quantization: bool = False, command: str = "compare", elsewhere: bool = False
) -> list[tuple[Path, Manifest]]:
    """Completed runs of one base (and one quantization unless mixed_quantization), with distinct names. `elsewhere`:
    a folder a plain script saved a result in (a PEFT adapter) counts as a run of the base it names."""
    runs = []
    for run_dir in run_dirs:
        made = elsewhere_run(Path(run_dir)) if elsewhere and run_status(run_dir) is None else None
        if made is not None:
            runs.append((Path(run_dir), made))
            continue
        manifest = read_manifest(run_dir)
        if (why := unfinished(Path(run_dir), manifest)) is not None:
            raise TunelabError(f"{run_dir}: run {why}; {command} uses completed runs only")
        if model_head(manifest.method or "") != "lm":
            raise TunelabError(
                f"{command}: {run_dir} is a reward model (method: {manifest.method}), which scores replies and writes "
                f"none; its held-out pair accuracy is in `tunelab show {run_dir}`"
            )
        runs.append((Path(run_dir), manifest))
    if any(m.base_model is None for _, m in runs):
        raise TunelabError(
            f"{command}: {next(d for d, m in runs if m.base_model is None)}: its manifest names no base model"
        )
    fingerprints = {m.base_model.fingerprint for _, m in runs}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{d.name}: {m.base_model.id} ({m.base_model.fingerprint})" for d, m in runs)
        raise TunelabError(f"{command}: the runs do not share a base model ({listing}); give runs of one base")
    if len({m.quantized for _, m in runs}) > 1 and not mixed_quantization:
        listing = ", ".join(f"{m.name}: {m.quantized}" for _, m in runs)
        raise TunelabError(
            f"{command}: the runs were trained on differently quantized bases ({listing}); give each group on its "
            f"own, or pass --mixed-quantization to run all of them on the first run's base ({runs[0][1].quantized})"
        )
    names = [m.name for _, m in runs]
    if len(set(names)) != len(names):
        raise TunelabError(f"{command}: two runs share the name {sorted(n for n in names if names.count(n) > 1)[0]}")
    return runs


def elsewhere_run(folder: Path) -> Manifest | None:
    """A result a plain script saved in `folder` (compare_lora.py's adapters), recorded as a completed run of the base
    it names: None where the folder holds none."""
    from tunelab.models import fingerprint, weights_path
    from tunelab.scopes import made_elsewhere

    found = made_elsewhere(folder)
    if found is None:
        return None
    if not found.base:
        raise TunelabError(
            f"{folder}: names no base model (PEFT's base_model_name_or_path in its config); write the base's id or "
            "path there"
        )
    weights = weights_path(ModelSettings(id=found.base))
    return Manifest(
        name=folder.name,
        status="completed",
        scope=found.kind,
        trainable_params=found.trainable_params,
        base_model=BaseModelRecord(id=found.base, path=weights, fingerprint=fingerprint(weights, None)),
    )


# ---------------------------------------------------------------- generation


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], device: str, template_vars: dict, chat: bool | None
):
    """The prompts as the model reads them: through its chat template (`chat`), or, for a model trained on plain text
    (a base model without a template, or string prompts without data.as_chat), each prompt's text as it is, with the
    special tokens the tokenizer adds to any text (its BOS), as training tokenized it. `chat` None: the chat
    template where the tokenizer has one."""
    from tunelab.templates import as_template_reads

    if chat is None:
        chat = bool(tokenizer.chat_template)
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                as_template_reads(p.messages, tokenizer.get_chat_template(tools=p.tools), tokenizer),
                tools=p.tools,
                add_generation_prompt=True,
                tokenize=False,
                **template_vars,
            )
            for p in prompts
        ]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    for p in prompts:
        if [m["role"] for m in p.messages] != ["user"]:
            why = "the tokenizer has no chat template" if not tokenizer.chat_template else "a run trained on plain text"
            raise TunelabError(
                f"compare: prompt {p.id + 1} is a conversation, and {why} to render it; "
                "give prompts as plain 'prompt' strings, or set the runs' tokenizer.chat_template"
            )
    return tokenizer([p.text for p in prompts], return_tensors="pt", padding=True).to(device)


def asks_in_chat(tokenizer: PreTrainedTokenizerBase, manifest: Manifest | None) -> bool:
    """Whether a variant is asked through the chat template: the base where its tokenizer has one; a run as its
    training rendered its data (a run recorded before that was, like the base)."""
    trained = manifest.data.rendered if manifest is not None and manifest.data is not None else None
    return bool(tokenizer.chat_template) and trained != "text"


GREEDY: dict = {"do_sample": False}


def stop_ids(model, tokenizer, manifests: list[Manifest]) -> list[int]:
    """Where a reply ends: the tokenizer's EOS, the model's own stop tokens, and each run's turn terminator
    (Gemma's <end_of_turn> is not its EOS)."""
    from tunelab.templates import stop_token_ids

    terminators = [m.terminator for m in manifests]
    extra = [tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in terminators if t)]
    return stop_token_ids(model.generation_config.eos_token_id, extra)


@dataclass
class ToolUse:
    """A GRPO run's tools (grpo.tools), run while compare asks every variant, as that run's sampling ran them: a
    reply that calls them gets their results and goes on, up to `rounds` times. `environment`: the run's
    grpo.environment class, of which each reply gets an instance (in_environments), whose methods it may call too.
    `parser`: the tokenizer with the response parser TRL reads calls with
    (trl.chat_template_utils.add_response_schema)."""

    functions: dict[str, Callable]
    rounds: int
    environment: type | None = None
    parser: PreTrainedTokenizerBase | None = None

    def functions_of(self, prompt: Prompt) -> dict[str, Callable]:
        """What a reply to `prompt` may call: the tools, and the methods of the environment instance it is asked in."""
        from tunelab.rewards import environment_tools

        if prompt.environment is None:
            return self.functions
        bound = environment_tools(type(prompt.environment))
        return {**self.functions, **{f.__name__: getattr(prompt.environment, f.__name__) for f in bound}}


def in_environments(prompts: list[Prompt], tool_use: ToolUse | None) -> list[Prompt]:
    """Each prompt with an instance of its own of the run's environment, as GRPO's sampling makes one a reply: reset
    with the prompt's row (`prompt` and the row's other fields); a string it returns is appended to the last
    message, as TRL appends it. The prompts as they are where the run has no environment."""
    if tool_use is None or tool_use.environment is None:
        return prompts
    asked = []
    for i, p in enumerate(prompts):
        instance = tool_use.environment()
        try:
            observation = instance.reset(prompt=p.messages, **p.fields)
        except Exception as e:  # noqa: BLE001 - the user's class: one line that says where
            name = tool_use.environment.__name__
            raise TunelabError(
                f"compare: {name}.reset failed on prompt {i + 1} ({type(e).__name__}: {e}); it is called with the "
                "prompt row's fields, as in training: give --prompts rows the fields it reads"
            ) from e
        messages = p.messages
        if isinstance(observation, str):
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + observation}]
        asked.append(replace(p, messages=messages, environment=instance))
    return asked


def environment_rewards(asked: list[Prompt]) -> list[float | None] | None:
    """Each reply's reward by its environment instance's get_reward (read once its exchange ended, as TRL reads it),
    where the environment has one; None where the prompts were asked in no environment or it has no get_reward."""
    instances = [p.environment for p in asked]
    if not instances or any(i is None or not callable(getattr(i, "get_reward", None)) for i in instances):
        return None
    return [i.get_reward() for i in instances]


# A reply: its text, or where it called tools, the exchange: its calls, their results, and what it said after them.
Reply = str | list[dict]


def generate_rows(
    model,
    tokenizer,
    rows: list[tuple[Prompt, str | None]],
    max_new_tokens: int,
    batch_size: int,
    decoding: dict = GREEDY,
    template_vars: dict | None = None,
    chat: bool | None = None,
    tool_use: ToolUse | None = None,
    streamer=None,
) -> list[Reply]:
    """One output per (prompt, adapter) row, in batches; rows of one batch may use different adapters
    (PEFT `adapter_names`, "__base__" for none). An adapter of None means a model without adapters.
    `template_vars`: what the chat template sees beside each prompt (templates.template_vars); `chat`: prompts go
    through the chat template (asks_in_chat), else as plain text. `tool_use`: the tools a reply's calls run.
    `streamer`: Transformers' streamer, handed the tokens of one row's reply as they come (batches of one)."""
    outputs: list[Reply] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = encode_prompts(tokenizer, [p for p, _ in chunk], model.device, template_vars or {}, chat)
        routing = {"adapter_names": [a for _, a in chunk]} if chunk[0][1] is not None else {}
        out = model.generate(
            **enc,
            **routing,
            **{"eos_token_id": tokenizer.eos_token_id, **decoding},
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **({"streamer": streamer} if streamer is not None else {}),
        )
        new = out[:, enc["input_ids"].shape[1] :]
        if tool_use is None or not chat:
            outputs += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            continue
        prefixes = [ids[mask.bool()] for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        said = [_parsed(tool_use, tokenizer, ids, prefix, decoding) for ids, prefix in zip(new, prefixes, strict=True)]
        outputs += _go_on_after_tools(model, tokenizer, chunk, said, max_new_tokens, decoding, template_vars, tool_use)
    return outputs


def _parsed(tool_use: ToolUse, tokenizer, ids, prefix, decoding: dict) -> dict:
    """A reply's tokens (up to its stop token) as an assistant message, its tool calls read by the template's
    response parser as GRPO reads them (TRL's parse_response, after the prompt's tokens `prefix`)."""
    from trl.chat_template_utils import parse_response

    stops = decoding.get("eos_token_id") or tokenizer.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    kept = ids.tolist()
    end = next((i for i, token in enumerate(kept) if token in stops), len(kept) - 1)
    return parse_response(tool_use.parser or tokenizer, kept[: end + 1], prefix=prefix.tolist())


def _go_on_after_tools(
    model, tokenizer, rows, said: list[dict], max_new_tokens, decoding, template_vars, tool_use: ToolUse
) -> list[Reply]:
    """Each reply that calls tools gets their results (a tool message each) and is asked to go on, up to
    tool_use.rounds times; a reply without a call is its text."""
    calling = [i for i, m in enumerate(said) if m.get("tool_calls")]
    replies: list[Reply] = [[m] if i in calling else m.get("content", "").strip() for i, m in enumerate(said)]
    if not calling or tool_use.rounds < 1:  # a call made after the last round stays unanswered, as in training
        return replies
    exchanges = {i: [said[i], *run_tools(said[i]["tool_calls"], tool_use.functions_of(rows[i][0]))] for i in calling}
    asked = [(replace(rows[i][0], messages=rows[i][0].messages + exchanges[i]), rows[i][1]) for i in calling]
    fewer = replace(tool_use, rounds=tool_use.rounds - 1)
    then = generate_rows(
        model, tokenizer, asked, max_new_tokens, len(asked), decoding, template_vars, True, fewer
    )  # fmt: skip
    for i, after in zip(calling, then, strict=True):
        replies[i] = exchanges[i] + (after if isinstance(after, list) else [{"role": "assistant", "content": after}])
    return replies


def run_tools(calls: list[dict], functions: dict[str, Callable]) -> list[dict]:
    """A tool message for each call: the function's result, or the error it raised (as GRPO's sampling gives it)."""
    results = []
    for call in calls:
        function = call.get("function", {})
        name = function.get("name", "unknown")
        try:
            if name not in functions:
                raise ValueError(f"Tool {name} not found.")
            result = functions[name](**function.get("arguments", {}))
        except Exception as e:  # noqa: BLE001 - the model reads the error, as in training
            result = {"error": str(e)}
        results.append({"role": "tool", "name": name, "content": result if isinstance(result, list) else str(result)})
    return results


def reply_text(reply: Reply) -> str:
    """A reply as compare shows it: its text, or each call with its result, then what it said after them."""
    if isinstance(reply, str):
        return reply
    lines = []
    for m in reply:
        if m["role"] == "tool":
            lines.append(f"-> {m['content']}")
            continue
        for call in m.get("tool_calls") or []:
            function = call.get("function", {})
            arguments = ", ".join(f"{k}={v!r}" for k, v in (function.get("arguments") or {}).items())
            lines.append(f"{function.get('name')}({arguments})")
        if m.get("content"):
            lines.append(m["content"].strip())
    return "\n".join(lines)


def final_answer(reply: Reply) -> str:
    """What a reply answers in the end: its text, or where it called tools, what it said after them."""
    if isinstance(reply, str):
        return reply
    said = [m.get("content") or "" for m in reply if m["role"] == "assistant"]
    return said[-1] if said else ""


def generate(
    model,
    tokenizer,
    prompts: list[Prompt],
    adapter: str | None,
    max_new_tokens: int,
    batch_size: int,
    decoding: dict = GREEDY,
    template_vars: dict | None = None,
    chat: bool | None = None,
    tool_use: ToolUse | None = None,
    streamer=None,
) -> list[Reply]:
    rows = [(p, adapter) for p in prompts]
    return generate_rows(
        model, tokenizer, rows, max_new_tokens, batch_size, decoding, template_vars, chat, tool_use, streamer
    )


def generate_mixed(
    model,
    tokenizer,
    asked: dict[str, list[Prompt]],
    max_new_tokens: int,
    batch_size: int,
    decoding: dict = GREEDY,
    template_vars: dict | None = None,
    chat: bool | None = None,
    tool_use: ToolUse | None = None,
) -> dict[str, list[Reply]]:
    """One pass over each adapter's prompts (`asked`: the same prompts, each in an environment instance of the
    adapter's own where the run has one), every batch mixing the adapters' rows (all asked the same way, `chat`)."""
    adapters = list(asked)
    rows = [(prompts[i], a) for i in range(len(asked[adapters[0]])) for a, prompts in asked.items()]
    outputs = generate_rows(
        model, tokenizer, rows, max_new_tokens, batch_size, decoding, template_vars, chat, tool_use
    )  # fmt: skip
    return {a: outputs[i :: len(adapters)] for i, a in enumerate(adapters)}


def row_losses(
    model,
    tokenizer,
    rows: list[dict],
    batch_size: int = 8,
    fold_system: bool = False,
    template_vars: dict | None = None,
) -> Rows:
    """Per row, the summed loss on the tokens that carry loss in training (assistant turns / completions) and how
    many they are: `ratio` of them is the token-weighted mean loss."""
    import torch

    from tunelab.data import as_sft_row
    from tunelab.templates import tokenize_example

    measured: Rows = []
    examples = [tokenize_example(tokenizer, as_sft_row(r), "record", fold_system, template_vars) for r in rows]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.loss_mask, strict=True)])
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        shifted = labels[:, 1:].to(model.device)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="none"
        ).view(shifted.shape)
        counted = (shifted != -100).sum(1)
        measured += [(float(x), float(n)) for x, n in zip(loss.sum(1).tolist(), counted.tolist(), strict=True)]
    return measured


# ---------------------------------------------------------------- numbers


def _run_numbers(run_dir: Path, manifest: Manifest, lm_eval: dict[str, float]) -> tuple[dict, dict]:
    """A run's numbers as its files record them (and `lm_eval`: its stored lm-eval scores), and its curves."""
    if run_status(run_dir) is None:  # made elsewhere: what its files say
        from tunelab.scopes import made_elsewhere

        found = made_elsewhere(run_dir)
        return {"scope": f"{found.label} (made elsewhere)", "trainable_params": found.trainable_params}, {}
    metrics = read_metrics(run_dir)
    train_curve = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    eval_curve = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in metrics if r.get("tokens_per_s")]
    from tunelab.scopes import get_scope

    exp = load_run_experiment(run_dir)
    modules, layers = manifest.target_modules or [], _span(manifest.layers)
    scope = get_scope(exp.scope.kind).label(exp.scope, modules, layers)
    if manifest.quantization:
        scope += f" on {manifest.quantized}"
    numbers = {
        "method": manifest.method,
        "scope": scope,
        "trainable_params": manifest.trainable_params,
        "trainable_percent": manifest.trainable_percent,
        "train_seconds": manifest.train_seconds,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_memory_bytes": manifest.peak_memory_bytes,
        "final_train_loss": manifest.final_train_loss,
        "run_eval_loss": manifest.final_eval_loss,
        "preference_accuracy": manifest.preference_accuracy_after,
        "eval_reward": manifest.final_eval_reward,  # GRPO: its own held-out prompts' mean reward
    }
    numbers |= {LM_EVAL_PREFIX + k: v for k, v in lm_eval.items()}
    return numbers, {"train": train_curve, "eval": eval_curve}


def lm_eval_documents(
    runs: list[tuple[Path, Manifest]], include_base: bool
) -> tuple[dict[str, dict[str, Rows]], dict[str, bool]]:
    """Every variant's stored lm-eval values document by document (runs.lm_eval_docs; the base's as the runs stored
    them beside theirs), as Comparison.per_row holds them: per score, the documents in the order of the first
    variant that has it; a variant measured on other documents (another limit, another version of the task) is left
    out of that score's rows. And whether higher is better, by score."""
    found: dict[str, dict[str, dict[str, float]]] = {}  # variant -> score -> document -> value
    higher: dict[str, bool] = {}
    for d, m in runs:
        docs, base_docs, directions = lm_eval_docs(d)
        found[m.name] = {LM_EVAL_PREFIX + k: {doc: value for doc, value in v} for k, v in docs.items()}
        if include_base:
            for k, v in base_docs.items():
                found.setdefault("base", {})[LM_EVAL_PREFIX + k] = {doc: value for doc, value in v}
        higher |= {LM_EVAL_PREFIX + k: x for k, x in directions.items()}
    rows: dict[str, dict[str, Rows]] = {}
    order: dict[str, list[str]] = {}
    for name, by_key in found.items():
        for key, values in by_key.items():
            first = order.setdefault(key, list(values))
            if values.keys() == set(first):
                rows.setdefault(name, {})[key] = [(values[doc], 1.0) for doc in first]
    return rows, higher


def _span(layers: list[int] | None) -> str:
    from tunelab.scope import layer_ranges

    return layer_ranges(layers or []) or "-"


# ---------------------------------------------------------------- the comparison


def compare(
    run_dirs: list[Path],
    include_base: bool = True,
    prompts_file: Path | None = None,
    eval_file: Path | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    asked: list[str] | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    mixed_quantization: bool = False,
    eval_also: dict[str, Path] | None = None,
    pairs_file: Path | None = None,
    include_teachers: bool = True,
    judge_quantization: Quantization | None = None,
    against: str | None = None,
    checkpoints: bool = False,
) -> Comparison:
    """Check the runs share a base, read prompts and eval data, generate and score, assemble. Runs on a quantized
    base are compared on that same quantized base (the first run's settings load it). `include_teachers`: the
    teachers of distill runs (those not compared as runs already) answer and are scored beside them.
    `judge_quantization`: a published reward model among the runs scores loaded so, as grpo.reward_quantization
    loads it beside a policy. `against`: the variant every other is set against in Comparison.differences (None: the
    best of each quality). `checkpoints`: each completed run is followed by the other checkpoints it keeps
    (other_checkpoints), each a variant of its own (RUN@STEP)."""
    from tunelab.methods import get_method
    from tunelab.reward_model import is_reward_model
    from tunelab.runs import other_checkpoints
    from tunelab.scopes import checkpoint_views, read_as_runs

    judges = [d for d in run_dirs if is_reward_model(d)]  # reward models score the others' replies
    if len(judges) > 1:
        raise TunelabError(
            f"compare: {len(judges)} reward models given ({', '.join(map(str, judges))}); one scores the variants' "
            "replies: give one"
        )
    if judge_quantization is not None:
        _check_judge_quantization(judges, judge_quantization)
    run_dirs = [d for d in run_dirs if d not in judges]
    if checkpoints:
        run_dirs = [d for run_dir in run_dirs for d in (run_dir, *other_checkpoints(Path(run_dir)))]
    if not run_dirs:
        raise TunelabError(
            f"compare: {judges[0]} is a reward model, which scores replies and writes none; give the runs whose "
            f"replies it should score beside it (its held-out pair accuracy is in `tunelab show {judges[0]}`)"
        )
    with checkpoint_views(run_dirs) as views:  # a run's checkpoint as a run of its own: its view -> the checkpoint
        runs = load_runs(read_as_runs(run_dirs, views), mixed_quantization, elsewhere=True)
        if include_base and any(m.name == "base" for _, m in runs):
            raise TunelabError(
                "compare: a run is named 'base', like the untrained base model's column; compare it with --no-base, "
                "or retrain it under another --name"
            )
        first = next((d for d, _ in runs if run_status(d) is not None), None)
        exp = load_run_experiment(first) if first is not None else None
        teachers = distill_teachers(runs) if include_teachers else []
        names = (["base"] if include_base else []) + [m.name for _, m in runs] + [name for name, _ in teachers]
        if against is not None and against not in names:
            raise TunelabError(f"--against {against}: no variant of that name; the variants are {', '.join(names)}")
        # the first SFT run's held-out chats score every variant: a compared run's, else an SFT teacher's
        sft_runs = [d for d, m in runs if m.method == "sft"] + [
            t.run for _, t in teachers if t.run is not None and read_manifest(t.run).method == "sft"
        ]
        sft = load_run_experiment(sft_runs[0]) if sft_runs else None
        # GRPO runs are asked their own held-out prompts, whose fields their rewards read (an SFT run's chats have none)
        found = next(((d, m) for d, m in runs if m.method and get_method(m.method).held_out == "reward"), None)
        rewarded = (*found, load_run_experiment(found[0])) if found else None  # the first GRPO run, its experiment
        grpo_exp = rewarded[2] if rewarded else None
        splits = RunSplits()
        prompts, evaluation, asked_rows = _prompts_and_eval(
            grpo_exp or exp, sft, prompts_file, eval_file, asked, rewarded is not None, splits
        )
        prompts, tool_use, tools_note = with_run_tools(prompts, rewarded)
        held_out_splits = _held_out_sets(exp, sft, evaluation, eval_also or {})
        held_out = {name: split.rows for name, split in held_out_splits.items()}
        ranked = _held_out_pairs(runs, pairs_file, splits)
        trained_on, touched, unchecked = _trained_on(runs, held_out_splits, asked_rows, ranked, splits)
        pairs = ranked.rows if ranked is not None else []
        # Greedy unless a temperature is given; sampled outputs depend on the seed and on batch composition.
        decoding = GREEDY if temperature is None else {"do_sample": True, "temperature": temperature, "top_p": top_p}
        model = exp.model if exp is not None else ModelSettings(id=runs[0][1].base_model.id)
        template = exp.tokenizer if exp is not None else TokenizerSettings()
        outputs, measured, acted = _generate_and_score(
            model, template, first or runs[0][0], runs, include_base, prompts, held_out, pairs, max_new_tokens,
            batch_size, decoding, seed, teachers, tool_use,
        )  # fmt: skip
        stored = {d: lm_eval_scores(d) for d, _ in runs}  # each run's lm-eval scores and the base's beside them
        base_scores = {LM_EVAL_PREFIX + k: v for d, _ in runs for k, v in stored[d][1].items()}
        if include_base:
            for found in (outputs, measured, acted):
                if BASE in found:
                    found["base"] = found.pop(BASE)
        losses = {name: {key: ratio(rows) for key, rows in by_key.items()} for name, by_key in measured.items()}
        variants = [Variant("base", "base", numbers={**losses.get("base", {}), **base_scores})] if include_base else []
        for d, m in runs:
            numbers, curves = _run_numbers(d, m, stored[d][0])
            variants.append(
                Variant(m.name, m.scope, str(views.get(d, d)), {**numbers, **losses.get(m.name, {})}, curves)
            )
        for name, teacher in teachers:
            numbers = {"scope": f"teacher of distill: {teacher.label}", **losses.get(name, {})}
            variants.append(Variant(name, "teacher", str(teacher.run) if teacher.run else None, numbers))
        replies = {v.name: outputs[v.name] for v in variants}  # texts, or exchanges where replies called tools
        texts = {name: [reply_text(r) for r in said] for name, said in replies.items()}
        checks = {v.name: [check_output(p, o) for p, o in zip(prompts, texts[v.name], strict=True)] for v in variants}
        judge_accuracy = None
        if judges:
            scored, rewards_note, judge_accuracy = judge_scores(judges[0], prompts, replies, pairs, judge_quantization)
        else:
            scored, rewards_note = reward_scores(rewarded, prompts, replies, acted)
        for v in variants:
            by_prompt = measured.setdefault(v.name, {})
            if scored.get(v.name):
                by_prompt["reward"] = [(float(x), 1.0) for x in scored[v.name]]
            if any(checks[v.name]):
                by_prompt["expectation_pass_rate"] = [(sum(c.passed for c in cs), len(cs)) for cs in checks[v.name]]
            if any(p.reference is not None for p in prompts):
                answered = [
                    reference_scores(final_answer(said), p.reference) if p.reference is not None else None
                    for p, said in zip(prompts, replies[v.name], strict=True)
                ]
                for key in REFERENCE_SCORES:
                    by_prompt[key] = [(score[key], 1.0) if score else (0.0, 0.0) for score in answered]
            for key in ("reward", "expectation_pass_rate", *REFERENCE_SCORES):
                value = ratio(by_prompt[key]) if key in by_prompt else None
                v.numbers[key] = round(value, 4) if value is not None else None
            v.numbers.setdefault("eval_loss", None)
            loss = v.numbers["eval_loss"]
            v.numbers["perplexity"] = round(math.exp(loss), 4) if loss is not None else None
        lm_eval_rows, lm_eval_higher = lm_eval_documents(runs, include_base)
        for name, by_key in lm_eval_rows.items():
            measured.setdefault(name, {}).update(by_key)
        settings = {
            "decoding": "greedy" if temperature is None else f"sampling (temperature {temperature}, top_p {top_p})",
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "prompts": str(prompts_file) if prompts_file else "the command line" if asked else asked_rows.source,
            "eval_examples": len(evaluation.rows) if evaluation else 0,
            "eval_also_examples": {name: len(rows) for name, rows in held_out.items() if name != PRIMARY},
            "preference_pairs": len(pairs),  # pref acc: every variant on these pairs; without them, each run's own
            "base": runs[0][1].quantized,
            # runs trained on plain text (string prompts, no data.as_chat): asked their prompts as plain text too
            "asked_as_text": [m.name for _, m in runs if m.data is not None and m.data.rendered == "text"],
            "rewards": rewards_note,  # GRPO: which run's rewards scored every variant's outputs, or why none did
            "tools": tools_note,  # GRPO with grpo.tools: whose tools every prompt shows
            "judge_pair_accuracy": judge_accuracy,  # the reward model's share of the preference pairs ordered right
            "trained_on": trained_on,  # each run's training rows among the held-out rows and prompts, where it has any
            "trained_on_numbers": touched,  # the numbers of each such run measured on them: never marked best
            "trained_on_unchecked": unchecked,  # runs whose training rows could not be checked, and why
            # runs of one experiment under other seeds: Comparison.over_seeds (a checkpoint is its run, not a seed)
            "replicates": replicates([(d, m) for d, m in runs if d not in views]),
            "against": against,  # the variant the others are set against in differences; None: each quality's best
            "lm_eval_higher_is_better": lm_eval_higher,  # lm-eval's word on its scores: Comparison.lower_is_better
        }
        exchanges = {name: [r if isinstance(r, list) else None for r in said] for name, said in replies.items()}
        exchanges = {name: said for name, said in exchanges.items() if any(said)}
        return Comparison(model.id, settings, variants, prompts, texts, checks, exchanges, measured)


class RunSplits:
    """Runs' data as they trained on it (their experiment's sources, sample and held-out part), read once a setting."""

    def __init__(self) -> None:
        self.read: dict[str, Splits] = {}
        self.indexed: dict[str, TrainingRows] = {}

    @staticmethod
    def _key(exp: Experiment) -> str:
        return f"{exp.data.model_dump_json()} {exp.method} {exp.train.seed}"

    def of(self, exp: Experiment) -> Splits:
        from tunelab.data import load_splits

        key = self._key(exp)
        if key not in self.read:
            self.read[key] = load_splits(exp.data, exp.method, exp.train.seed)
        return self.read[key]

    def training_rows(self, exp: Experiment) -> TrainingRows:
        """The run's training rows, indexed once a setting (the runs of a ladder mostly share theirs)."""
        key = self._key(exp)
        if key not in self.indexed:
            self.indexed[key] = TrainingRows.of(self.of(exp).train)
        return self.indexed[key]

    def held_out(self, exp: Experiment) -> Split | None:
        """The rows the run held out: its data.eval (read alone), or the part data.eval_fraction kept out of its
        training sources; None where it held out none."""
        from tunelab.data import load_file

        if exp.data.eval is not None:
            loaded = load_file(exp.data.eval, "data.eval", exp.data, exp.method, exp.train.seed)
            return Split(loaded.rows, loaded.source.path, loaded.origins)
        return self.of(exp).eval if exp.data.eval_fraction else None


def _prompts_and_eval(
    exp: Experiment | None,
    sft: Experiment | None,
    prompts_file: Path | None,
    eval_file: Path | None,
    asked: list[str] | None,
    own_prompts: bool,
    splits: RunSplits,
) -> tuple[list[Prompt], Split | None, Split | None]:
    """Prompts asked on the command line (one user turn each), from the file, or from the runs' held-out data; eval
    rows from --eval or the first SFT run's held-out rows, as it held them out (its data.eval, or the part
    data.eval_fraction kept out of training); runs of preference methods alone have no SFT eval set: no eval loss
    then. `exp`: the experiment whose held-out data gives the prompts (the first GRPO run's, else the first tunelab
    run's), `sft` the first SFT run's; None where there is none. `own_prompts`: `exp`'s held-out prompts even where
    there are eval rows (a GRPO run's prompts carry the fields its rewards read). Also: the rows the prompts were
    taken from, where they were taken from data (a run that held out none gives its training rows, and says so)."""
    from tunelab.data import load_file

    data = sft.data if sft else exp.data if exp else DataSettings(train=str(eval_file))
    evaluation = None
    if eval_file:
        loaded = load_file(str(eval_file), "--eval", data, "sft")
        evaluation = Split(loaded.rows, str(eval_file), loaded.origins)
    elif sft is not None:
        evaluation = splits.held_out(sft)
    if asked:
        return [Prompt(i, [{"role": "user", "content": text}]) for i, text in enumerate(asked)], evaluation, None
    if prompts_file:
        return read_prompts(prompts_file), evaluation, None
    if exp is None:
        raise TunelabError(
            "compare: adapters made elsewhere carry no data to take prompts from; give --prompts FILE or --prompt TEXT"
        )
    source = (None if own_prompts else evaluation) or splits.held_out(exp)
    if source is None:  # the run held out nothing
        train = splits.of(exp).train
        source = Split(train.rows, f"{train.source} (training rows: the run held out none)", train.origins)
    prompts = held_out_prompts(source.rows)
    return prompts, evaluation, Split(source.rows[:PROMPTS], source.source, source.origins[:PROMPTS])


def _trained_on(
    runs: list[tuple[Path, Manifest]],
    held_out: dict[str, Split],
    asked_rows: Split | None,
    pairs: Split | None,
    splits: RunSplits,
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """What each tunelab run trained on among the rows every variant is measured on: the held-out sets' rows, the
    rows the prompts come from and the pairs ranked, counted where the run has the same row, or a row that asks the
    same. A variant's numbers there are partly recall (a seed or data ladder's runs each hold out other rows of one
    file). Returns the counts said by run, the numbers they touch by run, and the runs that could not be checked,
    with why."""
    from tunelab.data import prompt_of

    measured = [
        (f"{'eval' if name == PRIMARY else repr(name)} rows", split, [eval_key(name)])
        for name, split in held_out.items()
    ]
    if asked_rows is not None:
        kept = [i for i, row in enumerate(asked_rows.rows) if prompt_of(row) is not None]
        rows, origins = [asked_rows.rows[i] for i in kept], [asked_rows.origins[i] for i in kept]
        asked_numbers = ["expectation_pass_rate", "reward", *REFERENCE_SCORES]
        measured.append(("prompts", Split(rows, asked_rows.source, origins), asked_numbers))
    if pairs is not None and pairs.rows:
        measured.append(("preference pairs", pairs, ["preference_accuracy"]))
    said, touched, unchecked = {}, {}, {}
    for run_dir, manifest in runs:
        if run_status(run_dir) is None:  # a folder a plain script saved: its data is not known
            continue
        try:
            exp = load_run_experiment(run_dir)
            trained = splits.of(exp)
        except TunelabError as e:  # a run folder brought here without its data
            unchecked[manifest.name] = f"its training data cannot be read here ({e})"
            continue
        if changed := changed_sources(manifest.data.hashes if manifest.data else None, trained.hashes):
            unchecked[manifest.name] = f"its data changed since it trained ({', '.join(changed)})"
            continue
        index, counts, numbers = splits.training_rows(exp), [], []
        for what, split, keys in measured:
            seen = index.seen(split)
            if seen.count:
                counts.append(f"{seen.count:,} of the {seen.held:,} {what}")
                numbers += keys
        if counts:
            said[manifest.name], touched[manifest.name] = ", ".join(counts), numbers
    return said, touched, unchecked


# How many times compare lets a reply call tools and go on, where the GRPO run set no grpo.tool_rounds.
TOOL_ROUNDS = 4


def with_run_tools(
    prompts: list[Prompt], rewarded: tuple[Path, Manifest, Experiment] | None
) -> tuple[list[Prompt], ToolUse | None, str | None]:
    """The prompts as a GRPO run that sampled with tools (grpo.tools) was asked: each prompt without tools of its own
    shows that run's tools (as it trained with them: the files, or its kept copies of those that changed since), for
    every variant alike; the tools, which run when a reply calls them; and a note saying so."""
    from tunelab.rewards import KEPT_TOOLS, as_trained, load_environment, load_tools, shown_tools

    if rewarded is None or rewarded[2].grpo is None or not rewarded[2].grpo.acting:
        return prompts, None, None
    run_dir, manifest, exp = rewarded
    grpo = exp.grpo
    assert grpo is not None
    kept = as_trained(grpo.acting, run_dir, manifest.tool_hashes, KEPT_TOOLS)
    tools, environment = (kept[:-1], kept[-1]) if grpo.environment else (kept, None)
    schemas = shown_tools(tools, environment)
    asked = [p if p.tools else replace(p, tools=schemas) for p in prompts]
    names = ", ".join(spec.rpartition(":")[2] for spec in grpo.acting)
    rounds = grpo.tool_rounds or TOOL_ROUNDS
    acting_in = load_environment(environment) if environment else None
    tool_use = ToolUse({tool.__name__: tool for tool in load_tools(tools)}, rounds, acting_in)
    note = (
        f"{manifest.name}'s tools ({names}) shown with every prompt; a reply's calls run, and it goes on after their "
        f"results (up to {rounds} rounds)"
    )
    if acting_in is not None:
        note += f"; each reply acts in an instance of {acting_in.__name__} of its own, reset with its prompt's row"
    return asked, tool_use, note


def reward_scores(
    rewarded: tuple[Path, Manifest, Experiment] | None,
    prompts: list[Prompt],
    outputs: dict[str, list[Reply]],
    acted: dict[str, list[float | None]] | None = None,
) -> tuple[dict[str, list[float]], str | None]:
    """Every variant's reward on each prompt, by the first GRPO run's rewards (as it trained with them: the
    files, or its kept copies of those that changed since) and weights, each output scored as that run's training
    scored a sampled reply (with the prompt row's other fields); and a note of what scored them, or why nothing did
    (a reward needs a field the prompts lack: --prompts rows may carry the fields). `rewarded`: that run's folder,
    manifest and experiment; None where no GRPO run is compared. `acted`: each variant's replies' rewards by their
    environment instances' get_reward, added with weight 1 as TRL adds them."""
    from tunelab.rewards import as_trained, load_rewards

    if rewarded is None:
        return {}, None
    run_dir, manifest, exp = rewarded
    settings = exp.grpo
    assert settings is not None
    chat = manifest.data is None or manifest.data.rendered != "text"
    acted = acted or {}
    environment = [settings.environment.rpartition(":")[2]] if acted and settings.environment else []
    names = ", ".join([*(r.rpartition(":")[2] for r in settings.rewards), *environment])
    keys = sorted({k for p in prompts for k in p.fields})
    kwargs = {k: [p.fields.get(k) for p in prompts] for k in keys}
    asked = [p.messages if chat else p.text for p in prompts]
    weights = settings.reward_weights or [1.0] * len(settings.rewards)
    scores = {}
    try:
        # What it trained with: the files as they were, the reward models loaded as they were
        rewards = load_rewards(
            as_trained(settings.rewards, run_dir, manifest.reward_hashes), settings.reward_quantization
        )
        for name, said in outputs.items():
            completions = [r if isinstance(r, list) else [{"role": "assistant", "content": r}] for r in said]
            completions = completions if chat else said
            totals = [0.0] * len(prompts)
            for reward, weight in zip(rewards, weights, strict=True):
                values = reward(prompts=asked, completions=completions, **kwargs)
                totals = [t + weight * (v or 0.0) for t, v in zip(totals, values, strict=True)]  # None: not scored
            if name in acted:
                totals = [t + (v or 0.0) for t, v in zip(totals, acted[name], strict=True)]
            scores[name] = totals
    except TunelabError as e:
        return {}, f"not scored with {manifest.name}'s rewards ({names}): {e}"
    return scores, f"{manifest.name}'s rewards ({names}) on each variant's outputs"


def _check_judge_quantization(judges: list[Path], quantization: Quantization) -> None:
    """--judge-quantization needs a published reward model among the runs, and bitsandbytes where compare runs."""
    from tunelab.models import check_quantization, pick_device
    from tunelab.reward_model import MODEL_PREFIX

    if not judges:
        raise TunelabError(
            "--judge-quantization: no reward model is among the runs; give a published one (model:<hub id or "
            "folder>) to score the variants' replies"
        )
    if not str(judges[0]).startswith(MODEL_PREFIX):
        raise TunelabError(
            f"--judge-quantization: {judges[0]} is a reward run, which scores as it trained; export it with "
            f"`tunelab export {judges[0]} --out FOLDER --merge` and give model:FOLDER"
        )
    check_quantization(quantization, pick_device("auto"), "--judge-quantization")


def judge_scores(
    spec: str | Path,
    prompts: list[Prompt],
    outputs: dict[str, list[Reply]],
    pairs: list[dict],
    quantization: Quantization | None = None,
) -> tuple[dict[str, list[float]], str, float | None]:
    """Every variant's score on each prompt by a reward model (a run of method: reward, or model:<id>, loaded
    quantized where `quantization` says), each prompt and reply scored as the reward model's training scored a pair's
    answer; a note of what scored them; and the share of the preference `pairs` (compare's pref acc pairs) whose
    chosen answer it scores above the rejected one, how far to trust its scores (None without pairs)."""
    from tunelab.reward_model import MODEL_PREFIX, RewardModel, published_config

    if str(spec).startswith(MODEL_PREFIX):
        published_config(str(spec), "compare")
        judged_by = str(spec).removeprefix(MODEL_PREFIX)
        judged_by += f" ({quantization.describe()})" if quantization else ""
    else:
        judged_by = f"{read_manifest(Path(spec)).name} ({spec})"
    judge = RewardModel(str(spec), quantization=quantization)
    asked, shown = [p.messages for p in prompts], [p.tools for p in prompts]
    scores = {name: judge(asked, texts, shown) if texts else [] for name, texts in outputs.items()}
    note = f"the mean score of each variant's outputs by the reward model {judged_by}"
    if not pairs:
        return scores, note, None
    questions, tools = [p["prompt"] for p in pairs], [p.get("tools") for p in pairs]
    chosen, rejected = (judge(questions, [p[k] for p in pairs], tools) for k in ("chosen", "rejected"))
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    accuracy = round(right / len(pairs), 4)
    return scores, f"{note}, which orders {right} of the {len(pairs)} preference pairs right ({accuracy:.3f})", accuracy


PRIMARY = "eval"  # the eval data's set among the held-out sets: its loss is eval_loss


def eval_key(name: str) -> str:
    """The number a held-out set's loss is kept as: eval_loss for the eval data, eval_<name>_loss for the others."""
    return "eval_loss" if name == PRIMARY else f"eval_{name}_loss"


def parse_eval_also(items: list[str]) -> dict[str, Path]:
    """--eval-also NAME=FILE options, checked: a name as data.eval_also takes one, other than the eval data's."""
    sets = {}
    for item in items:
        name, _, path = item.partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", name) or name == PRIMARY or not path:
            raise TunelabError(
                f"--eval-also: '{item}' is not NAME=FILE with a name of lowercase letters, digits and _ other than "
                "'eval' (e.g. general=data/general.jsonl)"
            )
        if not Path(path).is_file():
            raise TunelabError(f"--eval-also: {path}: no such file")
        sets[name] = Path(path)
    return sets


def _held_out_sets(
    exp: Experiment | None, sft: Experiment | None, evaluation: Split | None, given: dict[str, Path]
) -> dict[str, Split]:
    """Every held-out set each variant is scored on, by name: the eval data, the --eval-also files and the first SFT
    run's data.eval_also sets (what the tuning costs elsewhere, measured on the same rows for every variant)."""
    from tunelab.data import load_file

    sets = {PRIMARY: evaluation} if evaluation else {}
    if sft is not None:
        for name, source in sft.data.eval_also.items():
            loaded = load_file(source, f"data.eval_also.{name}", sft.data, "sft", sft.train.seed)
            sets[name] = Split(loaded.rows, name, loaded.origins)
    data = sft.data if sft else exp.data if exp else None
    for name, path in given.items():
        settings = data or DataSettings(train=str(path))
        loaded = load_file(str(path), f"--eval-also {name}", settings, "sft")
        sets[name] = Split(loaded.rows, str(path), loaded.origins)
    return sets


def _held_out_pairs(runs: list[tuple[Path, Manifest]], pairs_file: Path | None, splits: RunSplits) -> Split | None:
    """Preference pairs every variant is asked to rank (pref acc): --pairs, else the first preference run's held-out
    pairs (its data.eval's, or those data.eval_fraction kept out of its training); None without either."""
    from tunelab.data import load_file
    from tunelab.methods import get_method

    if pairs_file is not None:
        loaded = load_file(str(pairs_file), "--pairs", DataSettings(train=str(pairs_file)), "dpo")
        return Split(loaded.rows, str(pairs_file), loaded.origins)
    for run_dir, m in runs:
        if m.method is None or not get_method(m.method).preference or run_status(run_dir) is None:
            continue
        held = splits.held_out(load_run_experiment(run_dir))
        if held is not None:
            kept = [i for i, row in enumerate(held.rows) if "chosen" in row]
            return Split([held.rows[i] for i in kept], held.source, [held.origins[i] for i in kept])
    return None


def _generate_and_score(
    model_settings: ModelSettings,
    template: TokenizerSettings,
    tokenizer_dir: Path,
    runs: list[tuple[Path, Manifest]],
    include_base: bool,
    prompts: list[Prompt],
    held_out: dict[str, list[dict]],
    pairs: list[dict],
    max_new_tokens: int,
    batch_size: int,
    decoding: dict,
    seed: int,
    teachers: list[tuple[str, Teacher]] | None = None,
    tool_use: ToolUse | None = None,
) -> tuple[dict[str, list[Reply]], dict[str, dict[str, Rows]], dict[str, list[float | None]]]:
    """Outputs, and the held-out sets' losses and pref acc row by row (Comparison.per_row), for every variant, loading
    the base once; each run's scope kind says how it goes on that base (attached beside it, swapped in for a while,
    or loaded on its own). The tokenizer is the one `tokenizer_dir` (the first tunelab run, else the first variant)
    was trained with. `teachers`: distill's teachers, each loaded on its own after the runs, asked as their students
    are (they share the students' tokenizer).
    `tool_use`: the tools every variant's calls run; where it names an environment, every variant's replies act in
    instances of their own, and the third result holds each reply's reward by its instance (environment_rewards)."""
    import torch

    from tunelab.methods.preference import preference_wins
    from tunelab.models import auto_tokenizer
    from tunelab.scopes import BaseLoader, attach_runs, base_alone
    from tunelab.teacher import load_teacher
    from tunelab.templates import template_vars

    base = BaseLoader.pick(model_settings)
    tokenizer = auto_tokenizer(tokenizer_folder(tokenizer_dir, model_settings))
    tokenizer.padding_side = "left"  # batched generation continues each row right after its prompt
    variables = template_vars(template, tokenizer)
    torch.manual_seed(seed)
    model = base.load().eval()
    decoding = {**decoding, "eos_token_id": stop_ids(model, tokenizer, [m for _, m in runs])}
    model, kinds = attach_runs(model, runs)
    tools = replace(tool_use, parser=response_parser(tokenizer)) if tool_use else None
    outputs: dict[str, list[Reply]] = {}
    measured: dict[str, dict[str, Rows]] = {}

    def score(name: str, scored_model) -> None:
        measured[name] = {
            eval_key(key): row_losses(
                scored_model, tokenizer, rows, fold_system=template.fold_system, template_vars=variables
            )
            for key, rows in held_out.items()
        }
        if pairs:
            won = preference_wins(scored_model, tokenizer, pairs, template.fold_system, variables)
            measured[name]["preference_accuracy"] = [(float(w), 1.0) for w in won]

    base_chat = asks_in_chat(tokenizer, None)
    chat = {m.name: asks_in_chat(tokenizer, m) for _, m in runs}
    names = [m.name for _, m in runs] + [name for name, _ in teachers or []] + ([BASE] if include_base else [])
    asked = {name: in_environments(prompts, tools) for name in names}  # each variant's replies their own instances
    # Runs asked as the base is share its batches where their kind allows; the others are asked on their own.
    together = [m.name for _, m in runs if chat[m.name] == base_chat and kinds[m.name].batches_with_base(model, m.name)]
    if together:
        mixed = {name: asked[name] for name in together + ([BASE] if include_base else [])}
        outputs.update(
            generate_mixed(model, tokenizer, mixed, max_new_tokens, batch_size, decoding, variables, base_chat, tools)
        )
    elif include_base:
        with base_alone(model):
            outputs[BASE] = generate(
                model, tokenizer, asked[BASE], None, max_new_tokens, batch_size, decoding, variables, base_chat, tools
            )
    # The base alone: a PEFT wrapper with every adapter off, or the plain model.
    if include_base:
        with base_alone(model):
            score(BASE, model)
    for d, m in runs:
        name = m.name
        with kinds[name].active(model, d, name, base) as variant:
            if name not in outputs:  # the kind made the run the model's active state: no routing
                outputs[name] = generate(
                    variant,
                    tokenizer,
                    asked[name],
                    None,
                    max_new_tokens,
                    batch_size,
                    decoding,
                    variables,
                    chat[name],
                    tools,
                )
            score(name, variant)
    taught = next((chat[m.name] for _, m in runs if m.method == "distill"), base_chat)
    for name, teacher in teachers or []:
        other = load_teacher(teacher, base.device)
        outputs[name] = generate(
            other, tokenizer, asked[name], None, max_new_tokens, batch_size, decoding, variables, taught, tools
        )
        score(name, other)
        del other
    acted = {name: environment_rewards(asked[name]) for name in names}
    return outputs, measured, {name: rewards for name, rewards in acted.items() if rewards is not None}


def response_parser(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer with the response parser a reply's tool calls are read with: its own, or the one TRL has for
    its chat template (GRPO with grpo.tools checked before training that one exists)."""
    import copy

    from trl.chat_template_utils import add_response_schema

    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        return tokenizer
    return add_response_schema(copy.copy(tokenizer))


def distill_teachers(runs: list[tuple[Path, Manifest]]) -> list[tuple[str, Teacher]]:
    """The teachers of the distill runs compared, except runs compared already, each under a variant name of its
    own ("teacher", or "teacher-1", "teacher-2", ... where there are several; none a run's name)."""
    from tunelab.teacher import resolve_teacher

    listed = {d.resolve() for d, _ in runs}
    found: dict[str, Teacher] = {}
    for d, m in runs:
        if m.method != "distill" or run_status(d) is None:
            continue
        teacher = resolve_teacher(load_run_experiment(d))
        if teacher.run is None or teacher.run.resolve() not in listed:
            found.setdefault(str(teacher.run.resolve()) if teacher.run else teacher.spec, teacher)
    candidates = (["teacher"] if len(found) == 1 else []) + [
        f"teacher-{i}" for i in range(1, len(runs) + len(found) + 2)
    ]
    names = [n for n in candidates if n not in {m.name for _, m in runs} | {"base"}]
    return list(zip(names, found.values(), strict=False))


def tokenizer_folder(run_dir: Path, settings: ModelSettings) -> Path | str:
    """The tokenizer a variant was trained with: a run's own copy, else the one a script saved beside its adapter,
    else the base's."""
    from tunelab.models import has_tokenizer, model_path

    for folder in (run_dir / TOKENIZER, run_dir):
        if folder.is_dir() and has_tokenizer(str(folder)):
            return folder
    return model_path(settings.id)
