"""Standard benchmarks through EleutherAI's lm-evaluation-harness: a base and runs on the same tasks.

The base loads once and each run goes on it the way its scope kind says (an adapter attached, partial tensors
swapped in, a full model loaded; a quantized base as trained), exactly as `compare` does; lm-eval then evaluates
that model object (its `HFLM` takes a model instance). Scores are stored in each run (`lm_eval.json`, task by
task, with the base's scores and the settings beside them) and appear as columns of `compare`; so are each
document's values of the scores that are a mean over documents, which compare pairs document by document.

Tasks are lm-eval's own names, or tasks the user defines in lm-eval's YAML format in a folder (`include_path`);
standard tasks download their data through `datasets`, so they need the network or a warm datasets cache.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import ConfigError
from tunelab.runs import Manifest, now, read_lm_eval, write_lm_eval

BASE = "base"


@dataclass(frozen=True)
class Harnessed:
    """What lm-eval measured on one model: 'task/metric' -> score; per document of the scores that are the mean of
    their documents' values, ['<doc_id>:<doc_hash>', value] (docs_of); and whether higher is better, by score."""

    scores: dict[str, float]
    docs: dict[str, list[list]]
    higher_is_better: dict[str, bool]


@dataclass(frozen=True)
class EvalSettings:
    tasks: list[str]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None  # lm-eval's meaning: a count of documents, or a fraction below 1
    batch_size: int = 16
    chat_template: bool = False  # wrap each prompt in the run's chat template (lm-eval's --apply_chat_template)


def documents(limit: float | None) -> int | float | None:
    """lm-eval's limit: a number of documents from 1 up (an int), a fraction of each task below 1."""
    return int(limit) if limit is not None and limit >= 1 else limit


def task_settings(settings: EvalSettings, task: str) -> dict:
    """The settings a stored score of `task` was measured with."""
    return asdict(settings) | {"tasks": [task]}


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tunelab eval needs lm-evaluation-harness ({e}); pip install 'tunelab[eval]'") from e


def task_manager(settings: EvalSettings):
    """lm-eval's task index, with the user's folder of task YAML files; unknown task names are refused with the
    closest known ones."""
    from lm_eval.tasks import TaskManager

    if settings.include_path is not None and not Path(settings.include_path).is_dir():
        raise ConfigError(f"--include-path: {settings.include_path} is not a folder of lm-eval task YAML files")
    manager = TaskManager(include_path=settings.include_path, verbosity="ERROR")
    known = set(manager.all_tasks)
    for task in settings.tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "list them with `lm-eval ls tasks`"
            where = f" (nor in {settings.include_path})" if settings.include_path else " (add --include-path DIR)"
            raise ConfigError(f"--tasks: '{task}' is not an lm-eval task{where}; {hint}")
    return manager


def evaluate_runs(
    run_dirs: list[Path], settings: EvalSettings, include_base: bool = True, mixed_quantization: bool = False
) -> dict[str, dict[str, float]]:
    """Scores ('task/metric' -> value) of the base and of every run; each run's scores are saved into it, a
    checkpoint's (<run>/checkpoints/checkpoint-<step>, evaluated as RUN@STEP) into the checkpoint."""
    from tunelab.compare import load_runs
    from tunelab.scopes import checkpoint_views, read_as_runs

    check_lm_eval()
    with checkpoint_views(run_dirs) as views:  # a run's checkpoint as a run of its own, its scores kept in it
        runs = load_runs(read_as_runs(run_dirs, views), mixed_quantization, "eval")
        return _evaluate(runs, settings, include_base, views)


def _evaluate(
    runs: list[tuple[Path, Manifest]], settings: EvalSettings, include_base: bool, kept_in: dict[Path, Path]
) -> dict[str, dict[str, float]]:
    """evaluate_runs of loaded runs; a run's scores are saved into its folder, or into the folder `kept_in` names."""
    import torch

    from tunelab.models import auto_tokenizer
    from tunelab.runs import TOKENIZER, load_run_experiment
    from tunelab.scopes import attach_runs, base_alone, run_scope
    from tunelab.templates import for_outside_renderer, template_vars

    manager = task_manager(settings)
    _, base = run_scope(*runs[0])
    tokenizer = auto_tokenizer(runs[0][0] / TOKENIZER)
    # lm-eval renders the chat template with no variables and string contents: the run's variables (Qwen3's
    # enable_thinking, Llama's fixed date) and text parts where the template reads those go into the template itself,
    # so its prompts are rendered as training rendered the data.
    variables = template_vars(load_run_experiment(runs[0][0]).tokenizer, tokenizer)
    tokenizer = for_outside_renderer(tokenizer, variables)
    model, kinds = attach_runs(base.load(), runs)
    measured: dict[str, Harnessed] = {}
    if include_base:
        with base_alone(model):
            measured[BASE] = _harness(model, tokenizer, settings, manager)
    for d, m in runs:
        with kinds[m.name].active(model, d, m.name, base) as variant, torch.no_grad():
            measured[m.name] = _harness(variant, tokenizer, settings, manager)
        _save(kept_in.get(d, d), m, settings, measured[m.name], measured.get(BASE))
    return {name: found.scores for name, found in measured.items()}


def _harness(model, tokenizer, settings: EvalSettings, manager) -> Harnessed:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        result = simple_evaluate(
            model=lm,
            tasks=settings.tasks,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=manager,
            apply_chat_template=settings.chat_template,
            log_samples=True,
            verbosity="ERROR",
        )
    scores = scores_of(result["results"])
    return Harnessed(scores, docs_of(result["samples"], scores), directions_of(result["higher_is_better"], scores))


def docs_of(samples: dict[str, list[dict]], scores: dict[str, float]) -> dict[str, list[list]]:
    """lm-eval's logged samples -> per score named as scores_of names it, each document's value as
    ['<doc_id>:<doc_hash>', value], for the scores that are the mean of those values (accuracy, exact match); not
    the others (perplexity, BLEU: aggregated over the whole corpus)."""
    found: dict[str, list[list]] = {}
    for task, logged in samples.items():
        for sample in logged:
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if not isinstance(value, int | float):  # bool is an int
                    continue
                name = metric if sample.get("filter", "none") == "none" else f"{metric},{sample['filter']}"
                document = f"{sample['doc_id']}:{sample.get('doc_hash', '')}"
                found.setdefault(f"{task}/{name}", []).append([document, float(value)])
    return {
        key: docs
        for key, docs in found.items()
        if key in scores and math.isclose(math.fsum(v for _, v in docs) / len(docs), scores[key], abs_tol=1e-9)
    }


def directions_of(higher: dict[str, dict[str, bool]], scores: dict[str, float]) -> dict[str, bool]:
    """lm-eval's higher_is_better, task -> metric -> bool, as score name -> bool (a filter's name dropped)."""
    out = {}
    for key in scores:
        task, _, metric = key.partition("/")
        value = higher.get(task, {}).get(metric.split(",")[0])
        if isinstance(value, bool):
            out[key] = value
    return out


def scores_of(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's results table -> {'task/metric': value}: numbers only, no standard errors, the default filter's
    name dropped ('acc,none' -> 'acc')."""
    out = {}
    for task, row in results.items():
        for key, value in row.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or "_stderr" in key:
                continue
            if key in ("sample_len", "sample_count"):
                continue
            metric = key.removesuffix(",none")
            out[f"{task}/{metric}"] = float(value)
    return out


@contextlib.contextmanager
def _quiet():
    """lm-eval draws progress bars, logs every step and runs `git describe` (which complains outside a repository):
    all of it goes to a scratch file instead of the terminal, and is shown only if the evaluation fails."""
    import sys
    import tempfile

    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if failed:
                scratch.seek(0)
                sys.stderr.write(scratch.read().decode(errors="replace")[-4000:])


def _save(run_dir: Path, manifest: Manifest, settings: EvalSettings, run: Harnessed, base: Harnessed | None) -> None:
    """Merge this evaluation into the run's lm_eval.json, task by task (a later evaluation of a task replaces the
    earlier one; other tasks stay)."""
    import lm_eval

    def of(task: str, found: dict) -> dict:
        return {k: v for k, v in found.items() if k.startswith(f"{task}/")}

    record = read_lm_eval(run_dir)
    for task in settings.tasks:
        record[task] = {
            "scores": of(task, run.scores),
            "base": of(task, base.scores) if base else None,
            "docs": of(task, run.docs),
            "base_docs": of(task, base.docs) if base else None,
            "higher_is_better": of(task, run.higher_is_better),
            "settings": task_settings(settings, task),
            "lm_eval_version": lm_eval.__version__,
            "evaluated_at": now(),
            "base_model": manifest.base_model.id if manifest.base_model else None,
        }
    write_lm_eval(run_dir, record)
