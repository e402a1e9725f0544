"""Terminal rendering of plans (rich); no logic beyond layout."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tunelab.config import model_head
from tunelab.console import human_seconds
from tunelab.methods.common import Batching
from tunelab.plan import Disk, Plan, Schedule, SplitStats, human_bytes
from tunelab.runs import DIED, Manifest, last_logged, resume_hint
from tunelab.scope import layer_ranges as ranges
from tunelab.starter import Starter, StudyStarter


def _console() -> Console:
    # Tables are wide; without a terminal to measure, give them room instead of rich's 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=160)


def group_modules(full_names: list[str], layer_path_hint: str = ".layers.") -> list[tuple[str, str]]:
    """Group module names as (layers, suffixes): layers sharing the same suffix set share a row."""
    by_layer: dict[int | None, set[str]] = {}
    for name in full_names:
        parts = name.split(".")
        index = next((int(p) for p in parts if p.isdigit()), None)
        by_layer.setdefault(index, set()).add(
            ".".join(p for p in parts[parts.index(str(index)) + 1 :]) if index is not None else name
        )
    rows: dict[tuple[str, ...], list[int]] = {}
    outside = sorted(by_layer.pop(None, set()))
    for index, suffixes in sorted(by_layer.items()):
        rows.setdefault(tuple(sorted(suffixes)), []).append(index)
    out = [(ranges(layers), ", ".join(s)) for s, layers in rows.items()]
    if outside:
        out.append(("-", ", ".join(outside)))
    return out


def _split_row(name: str, s: SplitStats | None) -> list[str]:
    if s is None:
        return [name, "-", "", "", "", "", ""]
    if not s.measured:
        return [name, str(s.examples), "", "", "", "", ""]
    return [
        name,
        str(s.examples),
        str(s.tokens_p50),
        str(s.tokens_p90),
        str(s.tokens_max),
        str(s.truncated),
        str(s.loss_tokens),
    ]


def batching_line(b: Batching, tokens_per_forward: int, unit: str = "examples") -> str:
    """`unit`: what a batch counts (GRPO's: replies)."""
    per_step = b.per_forward * b.accumulation
    rows = "one padding-free row each" if b.padding_free else "padded"
    draw = {"batch_rebalance": "drawn at random, split by length", "group_by_length": "grouped by length"}
    return (
        f"batches: {per_step} {unit} a step ({draw.get(b.sampling, 'drawn at random')}) in {b.accumulation} "
        f"forward passes of ~{b.per_forward}, {rows}; at most {tokens_per_forward:,} tokens a pass"
    )


def schedule_line(s: Schedule) -> str:
    """The run's steps, and when it evaluates and checkpoints."""
    steps = (
        f"{s.steps:,} optimizer steps (train.max_steps; an epoch is {s.per_epoch:,})"
        if s.max_steps
        else f"{s.steps:,} optimizer steps ({s.per_epoch:,} an epoch, {s.epochs:g} epoch{'s' * (s.epochs != 1)})"
    )
    at_epochs = "at each epoch's end"
    evaluated = "no held-out data to evaluate on"
    if s.evaluates:
        evaluated = f"evaluated every {s.evaluate_every:,} steps" if s.evaluate_every else f"evaluated {at_epochs}"
    saved = f"every {s.checkpoint_every:,} steps" if s.checkpoint_every else at_epochs
    if s.checkpoint_minutes is not None:
        saved += f" and after {s.checkpoint_minutes:g} minutes without one"
    return f"steps: {steps}; {evaluated}; a checkpoint {saved}, the last {s.checkpoints_kept} kept"


def print_starter(starter: Starter, console: Console | None = None) -> None:
    console = console or Console()
    exp, path = starter.exp, escape(str(starter.path))
    d = exp.data
    split = f" (split {d.hub_split})" if d.hub_split != "train" else ""
    held = f"eval from {escape(d.eval)}" if d.eval else f"{d.eval_fraction:.0%} held out for eval"
    held += f" (split {d.eval_split})" if d.eval_split else ""
    quantized = f" ({exp.model.quantization.describe()})" if exp.model.quantization else ""
    console.print(
        f"wrote {path}: {exp.method} on {escape(str(d.train))}{split} ({starter.data_format}, {starter.rows:,} rows, "
        f"{held}), {starter.trains} of {escape(exp.model.id)}{quantized}, learning rate {exp.train.learning_rate:g}",
        highlight=False,
    )
    if starter.read_from is not None:
        console.print(f"read from {escape(str(starter.read_from))}, never run; not carried over:", highlight=False)
        for item in starter.unread or ["nothing"]:
            console.print(f"  {escape(item)}", highlight=False)
        if starter.notes:
            console.print("where this file's run and the script's may differ:", highlight=False)
        for note in starter.notes:
            console.print(f"  {escape(note)}", highlight=False)
    console.print(f"next: tunelab plan {path}   (what trains, counts, memory, the loss mask; no weights load)")
    console.print(f"      tunelab train {path}", highlight=False)


def print_study_starter(study: StudyStarter, console: Console | None = None) -> None:
    console = console or Console()
    path = escape(str(study.path))
    console.print(
        f"wrote {path}: {len(study.variants)} variants, one a script, the first script's the base", highlight=False
    )
    for (name, variant), starter in zip(study.variants.items(), study.starters, strict=True):
        changes = ", ".join(sorted(variant["set"])) or "the base"
        after = f", after {variant['after']}" if "after" in variant else ""
        console.print(
            f"  {escape(name)} ({escape(str(starter.read_from))}): {escape(starter.trains)}{escape(after)}; sets "
            f"{escape(changes)}",
            highlight=False,
        )
        for item in starter.unread:
            console.print(f"    not carried over: {escape(item)}", highlight=False)
        for note in starter.notes:
            console.print(f"    note: {escape(note)}", highlight=False)
    console.print(f"next: tunelab study plan {path}   (every variant's scope, counts and memory)")
    console.print(f"      tunelab study run {path}", highlight=False)


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or _console()
    m, s, mem = plan.model, plan.scope, plan.memory
    console.print(
        f"[bold]{plan.name}[/bold]  {plan.method.upper()} · {s.kind} · {m.architecture} "
        f"({m.layers} layers, hidden {m.hidden_size}, vocab {m.vocab_size}) · {m.id}"
    )
    if s.lora_modules:
        table = Table(title="LoRA attaches to", title_justify="left", show_edge=False)
        table.add_column("layers")
        table.add_column("modules")
        for layers, mods in group_modules(s.lora_modules):
            table.add_row(layers, mods)
        console.print(table)
        console.print(
            f"{len(s.lora_modules)} modules; target_modules={s.target_modules}; "
            f"layers={ranges(s.layers)}" + (f"; layers_pattern='{s.layers_pattern}'" if s.layers_pattern else "")
        )
        console.print(f"adapter: {s.adapter}", highlight=False)
        if s.trained_tokens:
            console.print(f"token rows that train beside it: {', '.join(s.trained_tokens)}", highlight=False)
        if s.opened_modules:
            console.print(
                f"trained whole beside it (modules_to_save): {', '.join(s.opened_modules)} "
                f"({s.opened_params:,} parameters)",
                highlight=False,
            )
    else:
        table = Table(title="Parameters that open", title_justify="left", show_edge=False)
        table.add_column("layers")
        table.add_column("parameters")
        for layers, names in group_modules(s.trainable_names):
            table.add_row(layers, names)
        console.print(table)
    console.print(
        f"trainable [bold]{s.trainable_params:,}[/bold] of {s.total_params:,} parameters ({s.trainable_percent:.4f}%)"
    )
    mt = Table(
        title=f"Memory estimate ({mem.dtype}, {mem.tokens_per_forward:,} tokens a forward pass, device {mem.device})",
        title_justify="left",
        show_edge=False,
    )
    mt.add_column("part")
    mt.add_column("bytes", justify="right")
    mt.add_row(f"weights ({mem.quantized} base)" if mem.quantized else "weights", human_bytes(mem.weights_bytes))
    mt.add_row("gradients", human_bytes(mem.gradients_bytes))
    mt.add_row(f"optimizer ({mem.optimizer_name or 'AdamW'})", human_bytes(mem.optimizer_bytes))
    if mem.reference:
        mt.add_row(f"{plan.method.upper()} reference ({mem.reference})", human_bytes(mem.reference_bytes))
    if mem.teacher:
        mt.add_row(f"teacher ({mem.teacher}, frozen)", human_bytes(mem.teacher_bytes))
    if mem.reward_models:
        mt.add_row(f"reward model ({mem.reward_models}, frozen)", human_bytes(mem.reward_models_bytes))
    acts = mem.activations_checkpointed_bytes if mem.gradient_checkpointing else mem.activations_bytes
    mt.add_row(
        f"activations ({mem.activation_layers} layers{', checkpointed' if mem.gradient_checkpointing else ''})",
        human_bytes(acts),
    )
    if mem.sampling_bytes:
        mt.add_row("sampling (KV cache)", human_bytes(mem.sampling_bytes))
    mt.add_row("[bold]total[/bold]", f"[bold]{human_bytes(mem.total_bytes)}[/bold]")
    console.print(mt)
    if mem.quantized:
        kept = s.total_params - s.trainable_params - mem.quantized_params
        console.print(
            f"quantized {mem.quantized}: {mem.quantized_params:,} parameters of the decoder's linear layers; "
            f"kept unquantized in float32: {kept:,} (embeddings, norms, lm_head)"
        )
    if mem.master == "params" and not mem.quantized and mem.dtype != "float32":
        console.print(f"trained weights kept in float32, the forward in {mem.dtype} under autocast (master weights)")
    elif mem.master == "optimizer":
        console.print("trained weights in the model's dtype, their float32 master copy in DeepSpeed's optimizer")
    if mem.sharded:
        console.print(f"per process: {', '.join(mem.sharded)} split over {mem.processes} processes")
    if mem.device_bytes:
        console.print(
            f"device memory {human_bytes(mem.device_bytes)}; gradient checkpointing "
            f"{'on' if mem.gradient_checkpointing else 'off'} (activations without: "
            f"{human_bytes(mem.activations_bytes)}, with: {human_bytes(mem.activations_checkpointed_bytes)})"
        )
    unit = "replies" if plan.data is not None and plan.data.format == "prompt" else "examples"  # GRPO counts replies
    console.print(batching_line(plan.batching, plan.memory.tokens_per_forward, unit), highlight=False)
    console.print(schedule_line(plan.schedule), highlight=False)
    if plan.method_line:
        console.print(plan.method_line, highlight=False, markup=False)
    if plan.router_line:
        console.print(plan.router_line, highlight=False, markup=False)
    console.print(disk_line(plan.disk), highlight=False)
    if plan.data is not None:
        d = plan.data
        dt = Table(title=f"Data ({d.format})", title_justify="left", show_edge=False)
        # Prompts to sample replies for (GRPO, distill) supervise no token of the data: no loss tokens to count.
        columns = ("split", "examples", "tokens p50", "p90", "max", "truncated")
        # A reward model's loss is one a pair, on the score of each whole conversation, not on tokens.
        scores = model_head(plan.method) == "score"
        columns += () if d.format == "prompt" or scores else ("loss tokens",)
        for col in columns:
            dt.add_column(col, justify="right" if col != "split" else "left")
        named = [("train", d.train), ("eval", d.eval), *((f"eval {n}", s) for n, s in d.also.items())]
        for name, stats in named:
            dt.add_row(*_split_row(name, stats)[: len(columns)])
        console.print(dt)
        for name, stats in [(n, s) for n, s in named if s and 0 < s.measured < s.examples]:  # 0: no tokenizer
            console.print(
                f"{name}: the token columns count {stats.measured:,} of its {stats.examples:,} rows, spread over it, "
                "as plan reads them (tunelab train tokenizes every row)",
                markup=False,
                highlight=False,
            )
        if d.sources:
            console.print(d.sources, markup=False, highlight=False)
        if d.note:
            console.print(f"[dim]{d.note}[/dim]")
        if d.tokens is not None:
            console.print(tokens_line(d.tokens, scores), markup=False, highlight=False)
        if d.first_example:
            text = Text()
            for chunk, loss in d.first_example:
                text.append(chunk, style="bold green" if loss and not scores else "dim")
            if scores:
                console.print("First pair's chosen conversation, scored whole (at its last token):")
            elif d.format == "prompt" and not any(loss for _, loss in d.first_example):  # GRPO, a '<think>' template
                console.print("First prompt, as sampling continues it:")
            elif d.format == "prompt":  # GRPO: a prompt with an empty reply; its terminator is where sampling stops
                console.print(
                    "First prompt, with an empty reply (the token that ends a reply in [bold green]green[/]):"
                )
            else:
                console.print("First example (loss on [bold green]green[/bold green]):")
            console.print(text, markup=False, highlight=False)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)  # a fix may quote [a, b]


def disk_line(d: Disk) -> str:
    """What the run writes at its fullest, and the room there is for it."""
    free = f"{human_bytes(d.free_bytes)} free" if d.free_bytes is not None else "free space unknown"
    reused = f", {human_bytes(d.held_bytes)} of it there already" if d.held_bytes else ""
    many = f"at most {d.checkpoints} checkpoints" if d.checkpoints > 1 else "1 checkpoint"
    return (
        f"disk: {many} of {human_bytes(d.checkpoint_bytes)} (weights {human_bytes(d.checkpoint_weights_bytes)}, "
        f"optimizer {human_bytes(d.checkpoint_optimizer_bytes)}), then the {d.result} ({human_bytes(d.result_bytes)}): "
        f"{human_bytes(d.total_bytes)} at the fullest{reused}; {free} for {d.folder}"
    )


def tokens_line(t, scores: bool = False) -> str:
    """Turn terminator and pad token, the two tokens that decide whether a tuned model stops; for a reward model
    (`scores`), where its score is read."""
    if scores:
        ends = f"conversations end with {t.terminator}" if t.terminator else "no turn terminator found"
        return f"{ends}; pad token {t.pad_token} ({t.pad_source}): the score is read at the last token that is not it"
    if t.terminator is None:
        stop = "no turn terminator found"
    else:
        kind = "EOS" if t.terminator_is_eos else "not EOS: an export lists it as a stop token"
        stop = f"turns end with {t.terminator} ({kind}), supervised"
    line = f"{stop}; pad token {t.pad_token} ({t.pad_source})"
    if t.masking_template:
        line += (
            f"; loss masks from TRL's training version of the model's template, trl:{t.masking_template} (the "
            "model's own does not keep every reply, and its end, in one place; generation keeps it)"
        )
    return line


def preference_line(m: Manifest) -> str | None:
    """Held-out preference accuracy before and after training (share of pairs whose chosen answer the model
    finds likelier than the rejected one), for runs of preference methods."""
    if m.preference_accuracy_after is None:
        return None
    before = "-" if m.preference_accuracy_before is None else f"{m.preference_accuracy_before:.3f}"
    return f"preference accuracy {before} -> {m.preference_accuracy_after:.3f} (held-out pairs)"


def eval_lines(m: Manifest) -> list[str]:
    """The eval loss before training and of the result, then data.eval_also's, a line a set."""
    sets = {"": {"base": m.base_eval_loss, "final": m.final_eval_loss}} | {
        f"{name} ": losses for name, losses in (m.eval_also_losses or {}).items()
    }
    lines = []
    for name, losses in sets.items():
        base, final = losses.get("base"), losses.get("final")
        if base is not None and final is not None:
            ratio = f"{final / base:.2f}x the base" if base else ""
            if m.teacher is not None:  # distill: its loss is the divergence from the teacher's distributions
                ratio += ("; " if ratio else "") + "divergence from the teacher on replies sampled for held-out prompts"
            lines.append(f"eval {name}loss {base:.4f} -> {final:.4f}" + (f" ({ratio})" if ratio else ""))
    if m.final_eval_reward is not None:
        before = "-" if m.base_eval_reward is None else f"{m.base_eval_reward:.4f}"
        lines.append(f"eval reward {before} -> {m.final_eval_reward:.4f} (replies sampled for the held-out prompts)")
    return lines


def print_run(run_dir, manifest: Manifest, console: Console | None = None) -> None:
    console = console or _console()
    console.print(
        f"[bold]{manifest.name}[/bold] {manifest.status} in {manifest.train_seconds} s, "
        f"{manifest.global_steps} steps -> {run_dir}"
    )
    for line in eval_lines(manifest):
        console.print(line, highlight=False)
    if (kept := kept_line(manifest)) is not None:
        console.print(kept)
    if preference := preference_line(manifest):
        console.print(preference)
    check = manifest.change_check
    if check:
        console.print(
            f"tensor check: {check.trainable_changed} trained tensors changed, "
            f"{check.frozen_unchanged} frozen unchanged" + ("" if check.ok else " [red]FAILED[/red]")
        )
    if manifest.status == "completed" and model_head(manifest.method or "") == "lm":
        console.print(
            Text(f"next: tunelab chat {run_dir}   (talk to it) or tunelab compare {run_dir}   (beside its base)"),
            soft_wrap=True,
        )


def kept_line(m: Manifest) -> str | None:
    """Which weights the run kept, where train.keep or train.early_stop decided it."""
    stopped = f", stopped early at step {m.global_steps} (train.early_stop)" if m.stopped_early else ""
    if m.best_step is not None:
        return f"result: the best checkpoint, step {m.best_step}{stopped}"
    return f"result: the last step{stopped}" if stopped else None


def print_comparison(comparison, console: Console | None = None) -> None:
    from tunelab.compare import LM_EVAL_PREFIX
    from tunelab.report.html import (
        ALSO,
        NOT_TOLD_APART,
        best_cells,
        columns,
        difference_rows,
        differences_note,
        differences_title,
        not_told_apart_from_best,
        seed_rows,
        summary_rows,
    )

    console = console or _console()
    table = Table(title=f"Comparison on {comparison.base_model}", title_justify="left", show_edge=False)
    table.add_column("variant", overflow="fold")  # a name whole: a grid's names differ at their ends
    keep = (
        "eval loss",
        "trainable",
        "%",
        "train s",
        "final train loss",
        "pref acc",
        "eval reward",
        "reward",
        "expectations",
        "ref F1",
    )
    shown = columns(comparison)
    picked = [
        i
        for i, (key, title) in enumerate(shown)
        if title in keep or key.startswith(LM_EVAL_PREFIX) or ALSO.fullmatch(key)
    ]
    for i in picked:
        table.add_column(shown[i][1], justify="right")
    best = best_cells(comparison)
    for r, row in enumerate(summary_rows(comparison)):
        cells = [Text(row[i + 1], style="bold green" if (r, i + 1) in best else "") for i in picked]
        table.add_row(row[0], *cells)
    console.print(table)
    titles = dict(shown)
    close = not_told_apart_from_best(comparison)
    leaders = [
        f"{titles.get(key, key)}: {', '.join(names)}"
        + (f" ({NOT_TOLD_APART} {', '.join(close[key])})" if close.get(key) else "")
        for key, names in comparison.best().items()
    ]
    if leaders:
        console.print(Text("best: " + "; ".join(leaders)), soft_wrap=True)
    if comparison.settings.get("rewards"):  # what the reward column holds: a GRPO run's rewards or a reward model's
        console.print(Text(f"reward: {comparison.settings['rewards']}"), soft_wrap=True)
    if comparison.settings.get("tools"):  # a GRPO run's tools, shown with every prompt
        console.print(Text(f"tools: {comparison.settings['tools']}"), soft_wrap=True)
    if (note := comparison.trained_on_note()) is not None:
        console.print(Text(note, style="bold yellow"), soft_wrap=True)
    for title, (titles, body), note in (
        (
            differences_title(comparison),
            difference_rows(comparison, [shown[i][0] for i in picked]),
            differences_note(comparison),
        ),
        ("Over seeds (mean ± standard deviation)", seed_rows(comparison), None),
    ):
        if body:
            shown_table = Table(title=title, title_justify="left", show_edge=False)
            for i, column in enumerate(titles):
                shown_table.add_column(column, justify="right" if i else "left", overflow="fold")
            for row in body:
                shown_table.add_row(*row)
            console.print(shown_table)
            if note:
                console.print(Text(note, style="dim"), soft_wrap=True)


def print_outputs(comparison, console: Console | None = None) -> None:
    """Each prompt, then each variant's output to it: for prompts asked on the command line. Generated text is
    printed as text, never read as markup."""
    console = console or _console()
    for i, prompt in enumerate(comparison.prompts):
        console.print(Text(f"> {prompt.text}", style="bold"), soft_wrap=True)
        for name, outputs in comparison.outputs.items():
            console.print(Text(f"  {name}: ", style="dim") + Text(outputs[i]), soft_wrap=True)


def print_scores(scores: dict[str, dict[str, float]], console: Console | None = None) -> None:
    """lm-eval scores: one row a variant, one column a task's metric."""
    console = console or _console()
    table = Table(title="lm-evaluation-harness", title_justify="left", show_edge=False)
    table.add_column("variant", overflow="fold")  # a name whole: a grid's names differ at their ends
    metrics = sorted({k for row in scores.values() for k in row})
    for metric in metrics:
        table.add_column(metric, justify="right")
    for name, row in scores.items():
        table.add_row(name, *(f"{row[m]:.4f}" if m in row else "-" for m in metrics))
    console.print(table)


def print_study_plan(rows, measured_apart: str | None = None, console: Console | None = None) -> None:
    """The variants' plans side by side, then their warnings (each once, with the variants it is about), and where
    the comparison would measure variants on rows some trained on (study.measured_apart)."""
    console = console or _console()
    table = Table(title="Study plan", title_justify="left", show_edge=False)
    numbers = ("trainable", "%", "steps", "memory", "disk")
    for col in ("variant", "method", "scope", "modules", "layers", *numbers, "differs from base"):
        # a variant's name whole, on more lines where it must (a grid's names differ at their ends)
        table.add_column(
            col, justify="right" if col in numbers else "left", overflow="fold" if col == "variant" else "ellipsis"
        )
    for name, plan, diff in rows:
        s = plan.scope
        what = ",".join(s.target_modules) if s.lora_modules else f"{len(s.trainable_names)} tensors"
        table.add_row(
            name,
            plan.method,
            s.kind,
            what,
            ranges(s.layers),
            f"{s.trainable_params:,}",
            f"{s.trainable_percent:.3f}",
            f"{plan.schedule.steps:,}",
            human_bytes(plan.memory.total_bytes),
            human_bytes(plan.disk.total_bytes),
            "\n".join(diff) or "-",
        )
    console.print(table)
    said: dict[str, list[str]] = {}
    for name, plan, _ in rows:
        for warning in plan.warnings:
            said.setdefault(warning, []).append(name)
    for warning, names in said.items():
        who = "every variant" if len(names) == len(rows) > 1 else ", ".join(names)
        console.print(Text(f"warning ({who}): {warning}", style="yellow"), soft_wrap=True)
    if measured_apart is not None:
        console.print(Text(f"warning: {measured_apart}", style="yellow"), soft_wrap=True)


def print_study_outcome(outcomes, report, console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title="Study", title_justify="left", show_edge=False)
    for col in ("variant", "status", "run", "note"):
        table.add_column(col, overflow="fold" if col in ("variant", "run") else "ellipsis")
    for o in outcomes:
        table.add_row(o.name, o.status, o.run_dir or "-", o.error or "")
    console.print(table)
    if report:
        console.print(f"report: {report}")


def print_runs(rows: list[dict], console: Console | None = None) -> None:
    console = console or _console()
    table = Table(show_edge=False)
    rewarded = any(r.get("eval_reward") is not None for r in rows)  # GRPO runs: their held-out measure
    columns = ("name", "status", "method", "scope", "trainable %", "train loss", "eval loss")
    for col in (*columns, *(["eval reward"] if rewarded else []), "time", "disk", "created"):
        table.add_column(col)
    for r in rows:
        scope = r.get("scope") or "-"
        if r.get("target_modules"):
            scope += f" {', '.join(r['target_modules'])} L{ranges(r.get('layers') or [])}"
        if r.get("quantization"):
            scope += f" on {r['quantization']}"
        status = r.get("status")
        if r.get("logged_step") is not None and r.get("max_steps"):  # how far an unfinished run got
            status = f"{status} {r['logged_step']}/{r['max_steps']}"
        cells = [r.get("name"), status, r.get("method"), scope, _number(r.get("trainable_percent"), ".4g")]
        cells += [_number(r.get(k), ".4f") for k in ("final_train_loss", "eval_loss")]
        cells += [_number(r.get("eval_reward"), ".4f")] if rewarded else []
        cells += [human_seconds(r.get("train_seconds"))]
        cells += [
            human_bytes(r["disk_bytes"]) if r.get("disk_bytes") is not None else None,
            local_time(r.get("created_at")),
        ]
        # Text, not markup: names and paths come from disk and must print as they are.
        table.add_row(*(Text(str(x) if x is not None else "-") for x in cells))
    console.print(table)


def _number(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def local_time(stamp: str | None) -> str | None:
    """A manifest's ISO time (UTC) in this machine's time zone, to the minute; a stamp that is no time as it is."""
    import datetime as dt

    if stamp is None:
        return None
    try:
        return dt.datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """Values as a line of block characters, lowest to highest; long series are averaged into `width` cells."""
    if not values:
        return ""
    step = max(1, -(-len(values) // width))
    cells = [sum(values[i : i + step]) / len(values[i : i + step]) for i in range(0, len(values), step)]
    low, high = min(cells), max(cells)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in cells)


def tool_calls_line(m: Manifest, metrics: list[dict]) -> str | None:
    """GRPO with tools: how many calls a sampled reply made at each logged step (TRL's tools/call_frequency), and
    the share that failed."""
    logged = [r for r in metrics if "tools/call_frequency" in r]
    if not logged:
        return None
    calls = [r["tools/call_frequency"] for r in logged]
    failed = logged[-1].get("tools/failure_frequency", 0.0)
    names = ", ".join(spec.rpartition(":")[2] for spec in m.tool_hashes or {})
    return (
        f"tool calls ({names}) {sparkline(calls)} {calls[0]:.2f} -> {calls[-1]:.2f} a reply, {failed:.0%} failing at "
        f"the last ({len(calls)} logged)"
    )


def checkpoints_line(run_dir: Path, metrics: list[dict]) -> str | None:
    """The checkpoints a run keeps, each with the held-out measure logged at its step (eval loss, GRPO's eval
    reward), and for a completed run, how to set the first that is not its result beside it (compare takes a
    checkpoint as a run of its own: other_checkpoints)."""
    from tunelab.runs import checkpoint_step, checkpoints, held_out_measure, other_checkpoints

    kept = checkpoints(run_dir)
    if not kept:
        return None
    measure = held_out_measure(metrics)
    evals = {r["step"]: r[measure] for r in metrics if measure in r}
    steps = [checkpoint_step(c) for c in kept]
    label = measure.replace("_", " ")
    line = "checkpoints at steps " + ", ".join(f"{s} ({label} {evals[s]:.4f})" if s in evals else str(s) for s in steps)
    if others := other_checkpoints(run_dir):
        line += f"; tunelab compare {run_dir} {others[0]} sets step {checkpoint_step(others[0])} beside the result"
    return line


def rollouts_line(run_dir: Path) -> str | None:
    """Where a sampling run (GRPO, distill) keeps the replies it sampled, and for how many steps."""
    from tunelab.runs import ROLLOUTS

    kept = [f.stem.partition("-")[0] for f in (run_dir / ROLLOUTS).glob("*.parquet")]
    if not kept:
        return None
    return (
        f"replies sampled: {kept.count('train')} logged steps and {kept.count('eval')} evaluations in "
        f"{run_dir / ROLLOUTS}/ (train-<step>.parquet, eval-<step>.parquet)"
    )


def print_replies(kept: tuple[Path, list[dict]] | None, count: int, console: Console | None = None) -> None:
    """The first `count` replies a sampling run kept for its latest logged step: each prompt's last message, the
    reply (its calls and their results, where it called tools), and its rewards and advantage."""
    from tunelab.compare import reply_text

    console = console or _console()
    if kept is None:
        console.print(Text("no replies kept: the run samples none (GRPO and distill do), or logged no step yet"))
        return
    file, rows = kept
    shown = rows[:count]
    step = shown[0]["step"] if shown else "-"
    console.print(Text(f"replies sampled at step {step} ({len(shown)} of {len(rows)}; {file})"))
    for i, row in enumerate(shown, 1):
        prompt, reply = row["prompt"], row["completion"]
        asked = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        console.print(Text(f"[{i}] {asked}"), soft_wrap=True)
        console.print(Text(f"    -> {reply_text(reply)}".replace("\n", "\n       ")), soft_wrap=True)
        scores = [f"{k} {v:.2f}" for k, v in row.items() if k != "step" and isinstance(v, int | float)]
        if scores:
            console.print(Text("    " + "  ".join(scores)), soft_wrap=True)


def print_show(
    run_dir,
    manifest: Manifest,
    metrics: list[dict],
    benchmarks: tuple[dict[str, float], dict[str, float]] = ({}, {}),
    status: str | None = None,
    console: Console | None = None,
) -> None:
    """A run's summary; `benchmarks`: its stored lm-eval scores and the base's beside them; `status`: as shown
    (runs.shown_status), where it is not the recorded one."""
    console = console or _console()
    m = manifest
    status = status or m.status
    base = m.base_model.id if m.base_model else "-"
    quantized = f" on {m.quantization.describe}" if m.quantization else ""
    console.print(Text(f"{m.name}  {status}  {m.method} · {m.scope}{quantized} · {base}"))
    console.print(Text(f"folder {run_dir}; created {local_time(m.created_at)}; ended {local_time(m.ended_at) or '-'}"))
    if m.error:
        console.print(Text(f"error: {m.error}"), style="red")
    logged = last_logged(metrics)
    if status != "completed" and logged is not None and m.max_steps:
        console.print(f"step {logged:,} of {m.max_steps:,} logged ({logged / m.max_steps:.0%})")
    if status == DIED:
        console.print(
            Text(
                "no process trains it: it stopped without recording why (killed, out of memory, or its machine stopped)"
            ),
            style="red",
        )
    if status in ("interrupted", "failed", DIED):
        console.print(Text(f"resume: {resume_hint(Path(run_dir))}"))
    if m.trainable_params is not None:
        where = f"; modules {','.join(m.target_modules)}" if m.target_modules else ""
        console.print(
            f"trainable {m.trainable_params:,} of {m.total_params:,} ({m.trainable_percent:.4f}%); "
            f"layers {ranges(m.layers or [])}{where}"
        )
    if m.adapter:
        console.print(Text(f"adapter {m.adapter}"))
    if m.estimated_memory_bytes is not None:
        peak = (
            f"; measured peak {human_bytes(m.peak_memory_bytes)} ({m.peak_memory_measure})"
            if m.peak_memory_bytes
            else ""
        )
        console.print(
            f"{m.device} {m.dtype}; plan's memory estimate {human_bytes(m.estimated_memory_bytes)}{peak}; "
            f"gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}"
        )
    if m.data is not None:
        console.print(Text(f"data {m.data.format}: {m.data.train_examples} train, {m.data.eval_examples} eval"))
        if m.data.sampled_from:
            console.print(Text(m.data.sampled_from))
        for said in m.data.overlap or []:
            console.print(Text(f"warning: {said}", style="yellow"), soft_wrap=True)
    if m.teacher is not None:  # distill
        console.print(Text(f"teacher {m.teacher.id} (fingerprint {m.teacher.fingerprint})"))
    if m.global_steps is not None:
        seconds = f" in {m.train_seconds} s" if m.train_seconds is not None else ""
        tokens = f"; {m.tokens_seen:,} tokens seen" if m.tokens_seen is not None else ""
        console.print(f"{m.global_steps} steps{seconds}{tokens}")
    for line in eval_lines(m):
        console.print(line, highlight=False)
    if (kept := kept_line(m)) is not None:
        console.print(kept)
    if preference := preference_line(m):
        console.print(preference)
    rewards = [r["reward"] for r in metrics if "reward" in r]  # GRPO: the mean reward of each step's replies
    if rewards:
        console.print(
            f"train reward {sparkline(rewards)} {rewards[0]:.4f} -> {rewards[-1]:.4f} ({len(rewards)} logged)"
        )
    if line := tool_calls_line(m, metrics):
        console.print(line)
    if line := rollouts_line(Path(run_dir)):
        console.print(Text(line))
    if line := checkpoints_line(Path(run_dir), metrics):
        console.print(Text(line), soft_wrap=True)
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    if train_losses and not rewards:
        console.print(
            f"train loss {sparkline(train_losses)} {train_losses[0]:.4f} -> {train_losses[-1]:.4f} "
            f"({len(train_losses)} logged)"
        )
    scores, base_scores = benchmarks
    for metric, value in sorted(scores.items()):
        base_value = base_scores.get(metric)
        beside = f" (base {base_value:.4f})" if base_value is not None else ""
        console.print(Text(f"lm-eval {metric} {value:.4f}{beside}"))


def converse(session, asked: list[str] | None = None) -> None:
    """A chat (tunelab.chat.Chat): the turns `asked`, or read from standard input until /exit or its end, each shown
    with the reply streamed under it (as plain text, never read as markup). /reset starts the conversation over."""
    import sys

    from transformers import TextStreamer

    interactive = asked is None and sys.stdin.isatty()
    if interactive:
        how = "each turn on its own" if not session.in_chat else "/reset starts over"
        print(f"chat with {session.name} ({how}; /exit or Ctrl-D ends)")
    for turn in asked if asked is not None else _typed_turns(interactive):
        if turn == "/reset":
            session.reset()
            print("(conversation reset)")
            continue
        if not interactive:
            print(f"> {turn}")
        session.ask(turn, TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True), print)
        print(flush=True)


def _typed_turns(interactive: bool):
    """The turns typed (or piped) in, one a line, until /exit or the end of the input; blank lines are skipped."""
    import sys

    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.strip()
        if line == "/exit":
            return
        if line:
            yield line
