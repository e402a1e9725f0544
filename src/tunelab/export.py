"""Export a run as a standard folder that plain Transformers (or PEFT) loads.

What the folder holds is the scope kind's to say (`ScopeKind.export`): LoRA the adapter alone or merged into
the base, partial the base with the trained tensors in place, full the trained model. Each export carries
the run's tokenizer, its provenance and a model card (README.md, as the Hugging Face Hub reads one), and is
written to a temporary name first.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from tunelab.config import model_head
from tunelab.errors import TunelabError
from tunelab.runs import (
    TOKENIZER,
    Manifest,
    lm_eval_scores,
    load_run_experiment,
    now,
    read_manifest,
    unfinished,
    write_json,
)


def stop_at_terminator(model, tokenizer_dir: Path, terminator: str | None) -> None:
    """List the turn terminator the run was trained to emit among the stop tokens, so plain `generate` ends the
    reply there (a base model's generation_config often names only its EOS, e.g. Gemma's <eos>, not <end_of_turn>)."""
    from tunelab.models import auto_tokenizer
    from tunelab.templates import stop_token_ids

    if not terminator:
        return
    tokenizer = auto_tokenizer(tokenizer_dir)
    config = model.generation_config
    ids = stop_token_ids(config.eos_token_id, [tokenizer.convert_tokens_to_ids(terminator)])
    if ids != stop_token_ids(config.eos_token_id, []):
        config.eos_token_id = ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def export_run(run_dir: Path, out: Path, merge: bool = False) -> Path:
    """A completed run (or one of its checkpoints, as a run of its own: RUN@STEP) as a folder plain Transformers or
    PEFT loads, written whole or not at all."""
    from tunelab.scopes import checkpoint_views

    with checkpoint_views([Path(run_dir)]) as views:
        return _export(next(iter(views), Path(run_dir)), Path(run_dir), Path(out), merge)


def _export(run_dir: Path, source: Path, out: Path, merge: bool) -> Path:
    """export_run of the run in `run_dir`, recorded as exported from `source` (a checkpoint, where it is one)."""
    from tunelab.models import auto_tokenizer
    from tunelab.scopes import run_scope

    manifest = read_manifest(run_dir)
    if (why := unfinished(run_dir, manifest)) is not None:
        raise TunelabError(f"{run_dir}: run {why}; only completed runs can be exported")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out}: exists and is not empty; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kind, base = run_scope(run_dir, manifest, device="cpu")
    model, written = kind.export(run_dir, tmp, merge, base)
    if model is not None:
        if base.head == "score":  # a reward model finds each sequence's last token by the pad id it trained with
            model.config.pad_token_id = auto_tokenizer(run_dir / TOKENIZER).pad_token_id
        else:
            stop_at_terminator(model, run_dir / TOKENIZER, manifest.terminator)
        model.save_pretrained(tmp)  # safetensors
    for item in (run_dir / TOKENIZER).iterdir():
        shutil.copy2(item, tmp / item.name)
    (tmp / "README.md").write_text(model_card(run_dir, manifest, written))
    write_json(
        tmp / "tunelab-export.json",
        {
            "run": str(source.resolve()),
            "run_name": manifest.name,
            "kind": written,
            "base_model": manifest.base_model.model_dump() if manifest.base_model else None,
            "config_hash": manifest.config_hash,
            "exported_at": now(),
        },
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


# A name the Hub knows a model or dataset by ("org/name"), as opposed to a local path or a built-in model.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None and not Path(name).exists()


def _source(key: str) -> tuple[str, str | None]:
    """A data source's manifest key (its path or hub id, with [subset] and :split where it adds them) as the card
    names it, and its hub id if it is one: a local file or folder by its name alone (a card is shared; the folders
    of the machine it trained on are not)."""
    path = re.sub(r"(\[[^\]]*\])?(:[\w.-]+)?$", "", key)
    if _hub_id(path):
        return key, path
    return Path(path).name + key[len(path) :], None


def model_card(run_dir: Path, manifest: Manifest, written: str) -> str:
    """README.md for an exported run: the Hub's metadata (base model, relation, library, datasets) and what the run
    did, from its manifest and experiment, with no path of the machine it trained on."""
    exp = load_run_experiment(run_dir)
    base = manifest.base_model.id if manifest.base_model else exp.model.id
    sources = {_source(k): h for k, h in (manifest.data.hashes if manifest.data else {}).items()}
    meta: dict = {"library_name": "peft" if written == "adapter" else "transformers"}
    if _hub_id(base):
        meta |= {"base_model": base, "base_model_relation": "adapter" if written == "adapter" else "finetune"}
    if datasets := list(dict.fromkeys(hub for _, hub in sources if hub)):
        meta["datasets"] = datasets
    scores = model_head(manifest.method or "") == "score"
    meta |= {
        "pipeline_tag": "text-classification" if scores else "text-generation",
        "tags": [t for t in ("tunelab", manifest.method, manifest.scope) if t],
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {manifest.name}", ""]
    trained = f"{manifest.trainable_params:,} of {manifest.total_params:,} parameters" if manifest.total_params else ""
    lines += [
        f"`{base if _hub_id(base) else Path(base).name}` fine-tuned with tunelab: {manifest.method}, "
        f"{manifest.scope} ({trained}){_where(manifest)}, {manifest.quantized}. This folder holds "
        + HOLDS.get(written, f"the whole model, its {written} fine-tuning in place."),
        "",
        "## Results",
        "",
        "| | base | this model |",
        "|---|---|---|",
        *_result_rows(run_dir, manifest),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in _settings(exp, manifest).items()],
        "",
        "Data (sha256 prefix of what was read): "
        + ", ".join(f"{name} `{h}`" for (name, _), h in sources.items())
        + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()) + ".",
        "",
        "## Use",
        "",
        "```python",
        *_use(written, scores),
        "```",
        "",
    ]
    return "\n".join(lines)


HOLDS = {"adapter": "the adapter alone (PEFT).", "merged": "the base with the adapter merged into its weights."}


def _where(manifest: Manifest) -> str:
    parts = []
    if manifest.target_modules:
        parts.append("on " + ", ".join(manifest.target_modules))
    if manifest.layers is not None:
        parts.append(f"in {len(manifest.layers)} layers ({_ranges(manifest.layers)})")
    return ", " + " ".join(parts) if parts else ""


def _ranges(layers: list[int]) -> str:
    """0, 1, 2, 5 -> '0-2, 5'."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _result_rows(run_dir: Path, manifest: Manifest) -> list[str]:
    rows = [f"| eval loss | {_number(manifest.base_eval_loss)} | {_number(manifest.final_eval_loss)} |"]
    if manifest.final_eval_reward is not None:  # GRPO: replies sampled for the held-out prompts, scored
        rows = [f"| eval reward | {_number(manifest.base_eval_reward)} | {_number(manifest.final_eval_reward)} |"]
    if manifest.teacher is not None:  # distill: its loss is the divergence from the teacher's distributions
        rows = [f"| eval divergence from the teacher | {_number(manifest.base_eval_loss)} | "
                f"{_number(manifest.final_eval_loss)} |"]  # fmt: skip
    for name, losses in (manifest.eval_also_losses or {}).items():
        rows.append(f"| eval {name} loss | {_number(losses.get('base'))} | {_number(losses.get('final'))} |")
    if manifest.preference_accuracy_after is not None:
        before, after = manifest.preference_accuracy_before, manifest.preference_accuracy_after
        rows.append(f"| preference accuracy (held-out pairs) | {_number(before)} | {_number(after)} |")
    scores, base_scores = lm_eval_scores(run_dir)
    rows += [f"| {task} (lm-eval) | {_number(base_scores.get(task))} | {_number(v)} |" for task, v in scores.items()]
    return rows


def _settings(exp, manifest: Manifest) -> dict[str, str]:
    t = exp.train
    batching = manifest.batching or {}
    return {
        "method": manifest.method or "",
        **(
            {"teacher": f"{manifest.teacher.id} (fingerprint `{manifest.teacher.fingerprint}`)"}
            if manifest.teacher
            else {}
        ),
        **{
            what: ", ".join(f"{_function_name(spec)} (`{digest}`)" for spec, digest in hashes.items())
            for what, hashes in (("rewards", manifest.reward_hashes), ("tools", manifest.tool_hashes))
            if hashes
        },
        "learning rate": f"{t.learning_rate:g} ({t.scheduler}, warmup {t.warmup:g})",
        "steps": f"{manifest.global_steps} ({t.epochs:g} epochs)" if not t.max_steps else str(manifest.global_steps),
        "batch": f"{t.batch_size} x {t.grad_accumulation} accumulation",
        "max length": str(t.max_length),
        "seed": str(t.seed),
        "dtype": f"{manifest.dtype} on {manifest.device}",
        "examples": f"{manifest.data.train_examples} train, {manifest.data.eval_examples} eval"
        if manifest.data
        else "",
        "padding-free": str(batching.get("padding_free", "")),
        **({"NEFTune": f"noise alpha {t.neftune:g}"} if t.neftune else {}),
        "chat template": f"`{manifest.chat_template_hash}` (sha256 prefix), replies end with `{manifest.terminator}`"
        if manifest.chat_template_hash
        else "none",
        "experiment hash": f"`{manifest.config_hash}`",
    }


def _function_name(spec: str) -> str:
    """A GRPO reward or tool as the card names it: its file's name and function (rewards.py:correct), TRL's as TRL
    names it, a reward model by its folder's or hub id's last part; no path of this machine."""
    if spec.startswith("trl:"):
        return spec
    file, sep, function = spec.rpartition(":")
    if sep and file.endswith(".py"):
        return f"{Path(file).name}:{function}"
    return Path(spec.removeprefix("model:")).name


def _use(written: str, scores: bool = False) -> list[str]:
    if scores:  # a reward model: one score a conversation, read at its last token
        loads = (
            ["from peft import AutoPeftModelForSequenceClassification", "from transformers import AutoTokenizer", "",
             'model = AutoPeftModelForSequenceClassification.from_pretrained("path/to/this/folder", num_labels=1)']
            if written == "adapter"
            else ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")']
        )  # fmt: skip
        return [
            *loads,
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            *(["model.config.pad_token_id = tokenizer.pad_token_id"] if written == "adapter" else []),
            'chat = [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]',
            'score = model(tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"])'
            ".logits[0, 0]",
        ]
    if written == "adapter":
        return [
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")  # loads the base it names',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        ]
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
    ]
