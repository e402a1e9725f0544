"""The `tunelab` command: parse, call one library function, render. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import ConfigError, Terminated, TunelabError

app = typer.Typer(
    help="Declarative fine-tuning experiments: plan, train and compare SFT/DPO runs with LoRA, partial or full "
    "fine-tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
STATE: dict = {"debug": False, "experiment": None}

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key, e.g. --set train.learning_rate=5e-6 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show the libraries' progress bars, logs and warnings too.")
    ] = False,
) -> None:
    from tunelab.console import set_verbosity

    STATE["debug"] = debug
    set_verbosity(verbose)


@app.command()
def schema() -> None:
    """Print the JSON Schema of experiment files (for editor autocompletion)."""
    from tunelab.config import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def init(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file to write (never replaced).")],
    model: Annotated[str | None, typer.Option("--model", help="Hub id or local folder of the base model.")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Training data: a file, a saved dataset or a hub id.")
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Held-out data (default: hold out 5% of --data).")
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            help="qv, qkvo, all-linear (the default), last-half (LoRA), partial-last4 (last 4 blocks, norm, "
            "lm_head) or full-ft.",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="sft, dpo, kto, orpo or simpo (default: what the data holds); grpo and distill start from "
            "their examples.",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Experiment name (default: data and scope).")] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split", help="Split of a folder or hub dataset to train on (default: train, or its one train_* split)."
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="Rename the data's fields, e.g. question=prompt,answer=completion (GSM8K)."),
    ] = None,
    as_chat: Annotated[
        bool, typer.Option("--as-chat", help="Train plain-text prompts and answers in the model's chat format.")
    ] = False,
    subset: Annotated[
        str | None,
        typer.Option("--subset", help="Subset (config) of a folder or hub dataset that has several (main for GSM8K)."),
    ] = None,
    from_script: Annotated[
        list[Path] | None,
        typer.Option(
            "--from-script",
            help="A training script (train_lora.py) whose model, data, trainer, LoraConfig or opened weights and "
            "training arguments the file takes, a TRL recipe (sft.yaml, as `trl sft --config` reads it) or a shell "
            "script that runs `trl sft ...`; read, never run. The other options override it. Given more than once, "
            "the file is a study: the first script's experiment the base, each script a variant.",
        ),
    ] = None,
) -> None:
    """Write a first experiment file for your model and data, every setting spelled out with what it does."""
    from tunelab.report.terminal import print_starter, print_study_starter
    from tunelab.starter import parse_columns, starter_from_script, study_from_scripts, write_starter

    renames = parse_columns(columns) if columns is not None else None
    flags = {"method": method, "name": name, "split": split, "columns": renames, "as_chat": as_chat, "subset": subset}
    if from_script and len(from_script) > 1:
        print_study_starter(study_from_scripts(experiment, from_script, model, data, eval_data, scope=scope, **flags))
        return
    if from_script:
        starter = starter_from_script(experiment, from_script[0], model, data, eval_data, scope=scope, **flags)
    elif model is None or data is None:
        raise TunelabError(f"{'--model' if model is None else '--data'}: missing; give it (or --from-script SCRIPT)")
    else:
        starter = write_starter(experiment, model, data, eval_data, scope or "all-linear", **flags)
    print_starter(starter)


@app.command()
def plan(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Resolve what will train, the parameter counts, the memory and the data, without loading weights."""
    from tunelab.config import load_experiment
    from tunelab.plan import make_plan

    STATE["experiment"] = experiment
    exp = load_experiment(experiment, overrides)
    result = make_plan(exp)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        from tunelab.report.terminal import print_plan

        print_plan(result)


@app.command()
def train(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    overrides: Overrides = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name (default: the experiment name).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an unfinished run from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --resume: continue although the data or experiment changed.")
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            help="Processes on this machine: DDP through torchrun, or accelerate launch with "
            "the experiment's distributed.accelerate_config.",
        ),
    ] = 1,
) -> None:
    """Plan, then train the experiment into <output.dir>/<name>/."""
    from tunelab import distributed
    from tunelab.config import load_experiment

    STATE["experiment"] = experiment
    exp = load_experiment(experiment, overrides, run_name=name)
    engine = distributed.read_engine(exp.distributed.accelerate_config)
    if not distributed.under_launcher() and (nproc > 1 or engine is not None):
        from tunelab.models import pick_device

        distributed.check_engine_device(engine, pick_device(exp.model.device))
        raise SystemExit(distributed.launch(nproc, _without_nproc(sys.argv[1:]), engine))
    from tunelab.inputs import read_inputs
    from tunelab.plan import make_plan
    from tunelab.report.terminal import print_plan, print_run
    from tunelab.train import train as run_training

    inputs = read_inputs(exp, training=True, engine=engine)  # read once: the plan and the run share them
    plan = make_plan(exp, inputs)
    if distributed.is_main():
        print_plan(plan)
    result = run_training(exp, resume=resume, overwrite=overwrite, force=force, inputs=inputs, plan=plan)
    if distributed.is_main():
        print_run(result.run_dir, result.manifest)


def _check_decoding(temperature: float | None, top_p: float) -> None:
    """compare's and chat's sampling options, refused where they decode nothing sampled."""
    if temperature == 0:
        raise TunelabError("--temperature: 0 is greedy decoding; leave --temperature out for that")
    if top_p == 0:
        raise TunelabError("--top-p: 0 keeps no token; give a value in (0, 1]")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


@app.command()
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories that share a base model (or adapter folders a PEFT script saved, or a run's "
            "checkpoints: RUN/checkpoints/checkpoint-N, shown as RUN@N); a reward model among them (a run of method: "
            "reward, or model:<hub id or folder>) scores the others' replies."
        ),
    ],
    base: Annotated[bool, typer.Option("--base/--no-base", help="Include the untrained base model.")] = True,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts",
            help="JSONL of prompt or messages (+ expectations, a reference answer).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    asked: Annotated[
        list[str] | None,
        typer.Option("--prompt", help="A prompt to ask, as one user turn (repeatable), instead of --prompts."),
    ] = None,
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="Held-out SFT data for eval loss.", exists=True, dir_okay=False)
    ] = None,
    eval_also: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-also",
            help="NAME=FILE: another held-out set every variant is scored on, as 'eval NAME loss' (repeatable).",
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="Preference pairs every variant ranks, for pref acc, and a reward model given orders (default: the "
            "first preference run's eval pairs).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for report.json/.md/.html.")] = Path("reports/compare"),
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generated tokens per output.", min=1, max=100_000)
    ] = 48,
    temperature: Annotated[
        float | None,
        typer.Option("--temperature", help="Sample at this temperature (default: greedy).", min=0),
    ] = None,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass, with --temperature.", min=0, max=1)
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 0,
    mixed_quantization: Annotated[
        bool,
        typer.Option(
            "--mixed-quantization", help="Compare runs of differently quantized bases on the first run's base."
        ),
    ] = False,
    teachers: Annotated[
        bool,
        typer.Option(
            "--teachers/--no-teachers", help="The teachers of distill runs answer too (those not given as runs)."
        ),
    ] = True,
    judge_bits: Annotated[
        int | None,
        typer.Option(
            "--judge-quantization",
            help="Load the published reward model among the runs (model:<id>) 4- or 8-bit, as "
            "grpo.reward_quantization loads it beside a policy.",
        ),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(
            "--against",
            help="Set every variant against this one (a run's name, or base) in the differences table, with 95% "
            "intervals; default: the best of each quality.",
        ),
    ] = None,
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints",
            help="Each run's other kept checkpoints too (not the one that is its result), each a variant of its own "
            "(RUN@STEP).",
        ),
    ] = False,
) -> None:
    """Same base, several runs, same prompts: outputs side by side with the numbers, as a report."""
    from tunelab.compare import compare as run_compare
    from tunelab.compare import parse_eval_also
    from tunelab.config import Quantization
    from tunelab.report import write_report
    from tunelab.report.terminal import print_comparison, print_outputs

    _check_decoding(temperature, top_p)
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--out {out}: is a file; give a folder for the report")
    if asked and prompts:
        raise TunelabError("--prompt and --prompts: give the prompts one way, on the command line or in a file")
    if judge_bits not in (None, 4, 8):
        raise TunelabError(f"--judge-quantization: {judge_bits} bits; bitsandbytes loads 4 or 8")

    result = run_compare(
        runs,
        include_base=base,
        prompts_file=prompts,
        eval_file=eval_file,
        asked=asked,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        mixed_quantization=mixed_quantization,
        eval_also=parse_eval_also(eval_also or []),
        pairs_file=pairs,
        include_teachers=teachers,
        judge_quantization=Quantization(bits=judge_bits) if judge_bits else None,
        against=against,
        checkpoints=checkpoints,
    )
    paths = write_report(result, out)
    print_comparison(result)
    if asked:
        print_outputs(result)
    print(f"report: {paths['html']}")


@app.command()
def chat(
    target: Annotated[
        str,
        typer.Argument(
            help="A run folder (or a run's checkpoint: RUN/checkpoints/checkpoint-N, or an adapter folder a PEFT "
            "script saved), or a base model: hub id, folder or builtin:<name>."
        ),
    ],
    asked: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt",
            help="A turn to ask (repeatable: the turns of one conversation, in order); without it, "
            "turns are read from standard input.",
        ),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="A run's base model, without the run.")] = False,
    system: Annotated[str | None, typer.Option("--system", help="A system message that opens the chat.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generated tokens per reply.", min=1, max=100_000)
    ] = 256,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="Sample at this temperature (default: greedy).", min=0)
    ] = None,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass, with --temperature.", min=0, max=1)
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 0,
) -> None:
    """Talk to a run or a base model: each reply streams as it is generated and the chat goes on from it; /reset
    starts over, /exit (or Ctrl-D) ends."""
    from tunelab.chat import open_chat
    from tunelab.report.terminal import converse

    _check_decoding(temperature, top_p)
    with open_chat(target, base, system, max_new_tokens, temperature, top_p, seed) as session:
        converse(session, asked)


@app.command("eval")
def eval_(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Run directories that share a base model, or their checkpoints (RUN/checkpoints/...)."),
    ],
    tasks: Annotated[str, typer.Option("--tasks", help="lm-eval task names, comma-separated.")],
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="A folder of your own lm-eval task YAML files.")
    ] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", help="Few-shot examples.", min=0)] = None,
    limit: Annotated[
        float | None, typer.Option("--limit", help="Documents per task (a fraction if below 1).", min=0)
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests per forward pass.", min=1)] = 16,
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Wrap prompts in the run's chat template.")
    ] = False,
    base: Annotated[bool, typer.Option("--base/--no-base", help="Evaluate the untrained base too.")] = True,
    mixed_quantization: Annotated[
        bool, typer.Option("--mixed-quantization", help="Runs of differently quantized bases on the first run's.")
    ] = False,
) -> None:
    """Benchmarks through lm-evaluation-harness: the base and each run on the same tasks, stored in each run."""
    from tunelab.lmeval import EvalSettings, documents, evaluate_runs
    from tunelab.report.terminal import print_scores

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise TunelabError("--tasks: give at least one lm-eval task name")
    settings = EvalSettings(
        tasks=names,
        include_path=str(include_path) if include_path else None,
        num_fewshot=num_fewshot,
        limit=documents(limit),
        batch_size=batch_size,
        chat_template=chat_template,
    )
    print_scores(evaluate_runs(runs, settings, include_base=base, mixed_quantization=mixed_quantization))


study_app = typer.Typer(help="Studies: a ladder of variants of one experiment.", no_args_is_help=True)
app.add_typer(study_app, name="study")


@study_app.command("plan")
def study_plan(study: Annotated[Path, typer.Argument(help="Study YAML file.")], overrides: Overrides = None) -> None:
    """One table of all variants before anything trains."""
    from tunelab.report.terminal import print_study_plan
    from tunelab.study import load_study, measured_apart, plan_study

    loaded = load_study(study, overrides)
    print_study_plan(plan_study(loaded), measured_apart(loaded))


@study_app.command("run")
def study_run(study: Annotated[Path, typer.Argument(help="Study YAML file.")], overrides: Overrides = None) -> None:
    """Run the variants in dependency order (unchanged ones are skipped), then compare them.

    --set applies to every variant (one that sets the same key keeps its own); --set output.dir=... moves the study.
    """
    from tunelab.report.terminal import print_study_outcome
    from tunelab.study import load_study, run_study

    outcomes, report = run_study(load_study(study, overrides))
    print_study_outcome(outcomes, report)
    if any(o.status in ("failed", "blocked") for o in outcomes):
        raise SystemExit(1)


@app.command()
def runs(
    root: Annotated[Path, typer.Argument(help="Folder of runs.")] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    name: Annotated[str | None, typer.Option("--name", help="Only runs whose name matches (e.g. 'lora-*').")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only runs with this status (running, completed, failed, interrupted, died)."),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Only runs whose base model id contains this.")] = None,
) -> None:
    """List runs, newest first."""
    from tunelab.runs import list_runs

    rows = list_runs(root, name=name, status=status, base=base)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        from tunelab.report.terminal import print_runs

        print_runs(rows)


@app.command()
def show(
    run: Annotated[Path, typer.Argument(help="Run directory, or one of its checkpoints (RUN/checkpoints/...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    replies: Annotated[
        int,
        typer.Option(
            "--replies",
            metavar="N",
            help="GRPO and distill: also print N of the replies sampled at the latest logged step.",
        ),
    ] = 0,
) -> None:
    """One run's summary: what trained, on what, how it went, and its loss curve."""
    from tunelab.runs import latest_rollouts, lm_eval_scores, read_manifest, read_metrics, shown_status
    from tunelab.scopes import checkpoint_views

    with checkpoint_views([run]) as views:  # a run's checkpoint: the run at that step, RUN@STEP
        folder = next(iter(views), run)
        manifest = read_manifest(folder)
        if as_json:
            print(manifest.model_dump_json(indent=2))
            return
        from tunelab.report.terminal import print_replies, print_show

        print_show(run, manifest, read_metrics(folder), lm_eval_scores(folder), shown_status(folder, manifest))
        if replies > 0:
            print_replies(latest_rollouts(folder), replies)


@app.command()
def prune(
    run_dirs: Annotated[list[Path], typer.Argument(help="Completed run directories.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
) -> None:
    """Remove completed runs' checkpoints (their earlier steps); results, metrics and manifests stay."""
    from tunelab.plan import human_bytes
    from tunelab.runs import check_prunable, prune_checkpoints

    for run in run_dirs:  # all of them, before anything goes
        check_prunable(run)
    total = 0
    for run in run_dirs:
        names, size, scored = prune_checkpoints(run, dry_run)
        total += size
        what = f"{len(names)} checkpoint{'s' if len(names) != 1 else ''}, {human_bytes(size)}" if names else "nothing"
        if scored:
            what += f", and the lm-eval scores kept in {', '.join(scored)}"
        print(f"{run}: {'would remove' if dry_run else 'removed'} {what}")
    if len(run_dirs) > 1:
        print(f"{'would free' if dry_run else 'freed'} {human_bytes(total)}")


@app.command()
def export(
    run: Annotated[
        Path, typer.Argument(help="Run directory (or one of its checkpoints: RUN/checkpoints/checkpoint-N).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge a LoRA adapter into the base.")] = False,
) -> None:
    """Export a run as a folder that plain Transformers or PEFT loads."""
    from tunelab.export import export_run

    print(f"exported to {export_run(run, out, merge)}")


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into an exit code it returns (in non-standalone mode)
            print("interrupted", file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except TunelabError as e:
        if STATE["debug"]:
            raise
        where = f"{STATE['experiment']}: " if isinstance(e, ConfigError) and STATE["experiment"] else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, read-only or missing folders: the file and the reason, no traceback
        if STATE["debug"] or e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.exceptions.TyperException as e:  # usage errors (typer's own click) carry their exit code
        if not hasattr(e, "show"):
            raise
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
