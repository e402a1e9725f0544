"""`tunelab train`: one experiment file -> one trustworthy run directory.

The steps, top to bottom: open the run, load data and tokenizer, load and scope the model, build the
trainer, measure the untrained eval loss, train (resuming if asked), save the result, check which
tensors changed, close the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab import distributed
from tunelab.config import Experiment, model_head
from tunelab.errors import ConfigError, Terminated, TunelabError, disk_full
from tunelab.runs import (
    ROLLOUTS,
    TOKENIZER,
    BaseModelRecord,
    DataRecord,
    Manifest,
    Provenance,
    Run,
    checkpoint_step,
    checkpoints,
    last_checkpoint,
    now,
    open_run,
    read_manifest,
    read_metrics,
    resume_hint,
)

if TYPE_CHECKING:
    import torch
    from transformers import TrainerCallback

    from tunelab.inputs import Inputs
    from tunelab.plan import Plan
    from tunelab.scopes import BaseLoader, ScopeKind
    from tunelab.templates import Encoded


@dataclass
class TrainResult:
    run_dir: Path
    manifest: Manifest


class NonFiniteLoss(TunelabError):
    pass


def _recorder(run: Run, on_tty: bool) -> TrainerCallback:
    from transformers import TrainerCallback

    from tunelab.console import human_seconds

    class Record(TrainerCallback):
        """metrics.jsonl, tokens/s, progress lines, and a stop on NaN/inf loss."""

        def __init__(self) -> None:
            self.started = self.last_time = time.perf_counter()
            self.first_step = 0
            self.last_tokens: float | None = None
            self.bad: str | None = None  # why training stopped early: a non-finite loss or weights

        def on_train_begin(self, args, state, control, **kw):
            run.began = True
            run.update(max_steps=state.max_steps)
            self.started = self.last_time = time.perf_counter()
            self.first_step = state.global_step
            # A fresh run starts from zero tokens; a resumed one learns its count at the first log.
            self.last_tokens = 0 if state.global_step == 0 else None

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return
            logs = dict(logs or {})
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
            now_ = time.perf_counter()
            elapsed = now_ - self.started
            tokens = logs.get("num_tokens")
            if tokens is not None and "loss" in logs:
                # real (non-pad) tokens per second since the previous training log
                if self.last_tokens is not None and now_ > self.last_time:
                    record["tokens_per_s"] = round((tokens - self.last_tokens) / (now_ - self.last_time), 1)
                self.last_tokens, self.last_time = tokens, now_
            run.log_metrics(record)
            loss = logs.get("loss")
            if loss is not None and not math.isfinite(loss):
                self.bad = f"the loss became {loss}"
                control.should_training_stop = True
                control.should_save = False
            if "loss" in logs:
                done = max(state.global_step - self.first_step, 1)
                eta = elapsed / done * (state.max_steps - state.global_step)
                line = (
                    f"step {state.global_step}/{state.max_steps}  loss {loss:.4f}  "
                    f"lr {logs.get('learning_rate', 0):.2e}  "
                    + (f"reward {logs['reward']:.3f}  " if "reward" in logs else "")  # GRPO's sampled completions
                    + f"{record.get('tokens_per_s') or 0:.0f} tok/s  ETA {human_seconds(eta)}"
                )
                print(("\r" + line.ljust(79)) if on_tty else line, end="" if on_tty else "\n", flush=True)
            elif "eval_reward" in logs:  # GRPO: the mean reward of completions sampled for the eval prompts
                print(("\n" if on_tty else "") + f"eval reward {logs['eval_reward']:.4f} at step {state.global_step}")
            elif scored := next((k for k in logs if k.startswith("eval_") and k.endswith("_loss")), None):
                which = scored.removesuffix("loss").replace("_", " ")  # eval_loss, eval_<name>_loss
                # a reward model: the share of held-out pairs it scores in order, as the trainer's batches average it
                # (DPO's implicit-reward accuracy is left out: 0 before the first step, where every margin is 0)
                ordered = logs.get("eval_accuracy")
                print(
                    ("\n" if on_tty else "")
                    + f"{which}loss {logs[scored]:.4f}"
                    + (f" (pair accuracy {ordered:.3f})" if ordered is not None else "")
                    + f" at step {state.global_step}",
                    flush=True,
                )

        def on_step_end(self, args, state, control, model=None, **kw):
            # A weight update can go non-finite while the loss that produced it was still finite: never let such
            # weights become a checkpoint that --resume (or a study re-run) would pick up.
            if control.should_save and model is not None and not _finite(model):
                control.should_save = False
                control.should_training_stop = True
                self.bad = "the trained weights became non-finite"

        def on_train_end(self, args, state, control, **kw):
            if on_tty:
                print(flush=True)

    return Record()


def _timed_checkpoints(minutes: float, period: int) -> TrainerCallback:
    """train.save_minutes: a checkpoint once that many minutes have passed since the last one (or since training
    began), beside the Trainer's own every save_steps or epoch, at a step that ends a sampled batch's `period` steps
    (Experiment.steps_per_sampling). Under several processes the first one's clock decides for all, since every
    process takes part in a checkpoint."""
    from transformers import TrainerCallback

    class TimedCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.since = time.monotonic()

        def on_train_begin(self, args, state, control, **kw):
            self.since = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            due = time.monotonic() - self.since >= minutes * 60 and state.global_step % period == 0
            if args.world_size > 1:
                due = _first_process_says(due, args.device)
            if due:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            self.since = time.monotonic()

    return TimedCheckpoints()


def _first_process_says(flag: bool, device: torch.device) -> bool:
    import torch
    import torch.distributed as dist

    said = torch.tensor([int(flag)], device=device)
    dist.broadcast(said, src=0)
    return bool(said.item())


def _phases(shown: bool):
    """Prints each phase of a run as it starts, with the time the previous one took (on the writing rank)."""
    previous, since = "", 0.0

    def phase(what: str) -> None:
        nonlocal previous, since
        if not shown:
            return
        took = f" ({previous} took {time.perf_counter() - since:.1f} s)" if previous else ""
        print(f"-> {what}{took}", flush=True)
        previous, since = what.split()[0], time.perf_counter()

    return phase


def peak_memory(device: str) -> tuple[int | None, str | None]:
    """The most memory this training held, and what was measured: on CUDA the tensors' peak (what plan
    estimates), on CPU the process's peak resident memory (tensors plus the Python process), on MPS the Metal
    driver's allocation at the end (PyTorch keeps no peak there)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    if device == "cpu":
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss if sys.platform == "darwin" else rss * 1024, "process peak RSS"
    if device == "mps":
        return torch.mps.driver_allocated_memory(), "mps driver allocation at the end"
    return None, None


def _finite(model) -> bool:
    import torch

    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """An exact fingerprint of every tensor's bytes."""
    import torch

    def exact(t: torch.Tensor) -> torch.Tensor:  # float32 holds every half-precision value: master copies compare
        return t.detach().cpu().float() if t.is_floating_point() and t.dtype != torch.float64 else t.detach().cpu()

    return {
        name: hashlib.sha256(exact(t).contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
        for name, t in tensors.items()
    }


def _change_check(before: dict[str, str], after: dict[str, str], trainable: list[str], steps: int) -> dict:
    """Which tensors changed: every trainable one should, no frozen one may.

    After a single step LoRA's A matrices have not moved yet: their gradient is zero while B is still zero.
    """
    opened = set(trainable)
    changed = {n for n in before if before[n] != after.get(n)}
    unchanged = sorted(n for n in opened - changed if not (steps == 1 and ".lora_A." in n))
    return {
        "frozen_changed": sorted(changed - opened),
        "trainable_unchanged": unchanged,
        "trainable_changed": len(changed & opened),
        "frozen_unchanged": len(set(before) - opened - changed),
        "ok": not (changed - opened) and not unchanged,
    }


def _base_eval(trainer, key: str) -> float | None:
    """The held-out measure `key` (eval_loss, GRPO's eval_reward) before the first step (eval_on_start), kept in the
    log history across a resume."""
    return next((r[key] for r in trainer.state.log_history if key in r and r.get("step") == 0), None)


def _also_losses(trainer, names: list[str]) -> dict[str, dict[str, float | None]] | None:
    """data.eval_also's losses before the first step and of the result (the best checkpoint's with train.keep: best,
    else the last evaluation's, which `_final_eval_loss` made sure of), from the Trainer's log history."""
    if not names:
        return None
    best = trainer.state.best_global_step if trainer.args.load_best_model_at_end else None
    out = {}
    for name in names:
        key = f"eval_{name}_loss"
        logged = [r for r in trainer.state.log_history if key in r]
        base = next((r[key] for r in logged if r.get("step") == 0), None)
        final = next((r[key] for r in logged if r.get("step") == best), None) if best else None
        out[name] = {"base": base, "final": final if final is not None else logged[-1][key] if logged else None}
    return out


def _final_eval(trainer, key: str) -> float:
    """The held-out measure `key` of the result: the best checkpoint's with train.keep: best, else the last step's,
    reusing the end-of-training evaluation when there was one.

    Decided from the Trainer's own log history, which every process holds, so all of them agree on
    whether to run the (collective) evaluation.
    """
    if trainer.args.load_best_model_at_end and trainer.state.best_metric is not None:
        return trainer.state.best_metric
    evals = [r for r in trainer.state.log_history if key in r]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return evals[-1][key]
    return trainer.evaluate()[key]


def _drop_incomplete(run: Run, chosen: Path) -> str:
    """Remove checkpoints newer than the one resumed from: a crash cut them short, and the Trainer would write
    into their folders again. Returns a note for the user."""
    import shutil

    cut = [c for c in checkpoints(run.dir) if checkpoint_step(c) > checkpoint_step(chosen)]
    for c in cut:
        shutil.rmtree(c)
    return f" (removed incomplete {', '.join(c.name for c in cut)})" if cut else ""


def _finished(checkpoint: Path) -> bool:
    """Whether a checkpoint holds the last step: the crash came after it, before the result was saved."""
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    stopped = bool(control.get("should_training_stop"))  # train.early_stop ended the run at this checkpoint
    return stopped or 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def _load_finished(trainer, checkpoint: Path) -> None:
    """Take a finished checkpoint's weights and state as the result, without a training step.

    `trainer.train(resume_from_checkpoint=...)` runs one more optimizer step when the checkpoint is already at
    max_steps (Transformers checks for the end after a step, not before), which would change the weights.
    """
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_global_step
    if trainer.args.load_best_model_at_end and best:  # train.keep: best, as the Trainer loads it at the end
        checkpoint = checkpoint.parent / f"checkpoint-{best}"
    # The Trainer's own checkpoint loader (adapters, sharded and safetensors weights); it has no public name.
    trainer._load_from_checkpoint(str(checkpoint))  # noqa: SLF001


def train(
    exp: Experiment,
    resume: bool = False,
    overwrite: bool = False,
    force: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    inputs: Inputs | None = None,
    group: str | None = None,
    plan: Plan | None = None,
) -> TrainResult:
    """Run one experiment into its run directory. `force` resumes even where the inputs changed; `callbacks`
    (Transformers TrainerCallbacks) join tunelab's own on the trainer, the way to observe or time a run;
    `inputs`: the experiment's data, tokenizer and configs when read already (by `plan`), not read again;
    `group`: what the trackers group this run under (a study's name; by default the experiment's name);
    `plan`: the experiment's plan over these inputs, when made already."""
    from tunelab.console import run_log
    from tunelab.data import rendered
    from tunelab.inputs import read_inputs
    from tunelab.methods import get_method
    from tunelab.models import fingerprint, pick_device, weights_path
    from tunelab.plan import check_rhythm, disk_refusal, make_plan
    from tunelab.rewards import KEPT_TOOLS, function_hashes, keep_copies
    from tunelab.scopes import init_source
    from tunelab.teacher import resolve_teacher, teacher_record
    from tunelab.templates import template_hash
    from tunelab.trackers import check_trackers

    if inputs is None or not inputs.complete:
        inputs = read_inputs(exp, training=True, engine=inputs.engine if inputs else None)
    engine, splits, tokenizer, encoded = inputs.engine, inputs.splits, inputs.tokenizer, inputs.encoded
    device = pick_device(exp.model.device)
    distributed.check_engine_device(engine, device)
    if (several := distributed.several_gpus(device, engine)) is not None:
        raise TunelabError(several)
    if engine is not None and not distributed.under_launcher():
        raise ConfigError(
            f"distributed.accelerate_config: this experiment runs under `accelerate launch` with "
            f"{engine.config_file.name}; start it with `tunelab train`, which launches it, not in this process"
        )
    check_trackers(exp.train.report_to)
    check_rhythm(
        exp, len(splits.train.rows), len(encoded[0].examples), len(encoded[0].no_loss_after(exp.train.max_length))
    )
    get_method(exp.method).check_data(exp, encoded, tokenizer)
    # A run that cannot fit on its disk would fail at a checkpoint, hours in; say so before anything loads.
    plan = plan or make_plan(exp, inputs)
    if (no_room := disk_refusal(plan.disk, exp.train.save_total_limit)) is not None:
        raise ConfigError(no_room)
    source = weights_path(exp.model, shown=distributed.is_main())
    base_fingerprint = fingerprint(source, exp.model.revision)
    init_from = init_source(exp, base_fingerprint)
    provenance = Provenance(
        base_model=BaseModelRecord(
            id=exp.model.id, path=source, revision=exp.model.revision, fingerprint=base_fingerprint
        ),
        init_from=str(init_from) if init_from else None,
        data=DataRecord(
            format=splits.format,
            train_examples=len(splits.train.rows),
            eval_examples=len(splits.eval.rows) if splits.eval else 0,
            hashes=splits.hashes,
            rendered=rendered(splits.train.rows),
            sampled_from=splits.sampled_from(),
            overlap=(plan.data.overlap if plan.data else None) or None,
        ),
        chat_template_hash=template_hash(tokenizer.chat_template),
        tokens=inputs.checks.record(),
        reward_hashes=function_hashes(exp.grpo.rewards) if exp.grpo else None,
        tool_hashes=function_hashes(exp.grpo.acting) if exp.grpo and exp.grpo.acting else None,
        teacher=teacher_record(resolve_teacher(exp), shown=distributed.is_main()) if exp.distill else None,
        processes=distributed.world_size(),
    )
    run = open_run(exp, resume, overwrite, distributed.is_main(), provenance, force)
    try:
        if exp.grpo is not None and run.writable:
            keep_copies(exp.grpo.rewards, run.dir)
            keep_copies(exp.grpo.acting, run.dir, KEPT_TOOLS)
        with run_log(run.dir) if run.writable else contextlib.nullcontext():
            result = _train_in(run, inputs, init_from, provenance, callbacks or [], group or exp.name)
        distributed.finish()
        return result
    except (KeyboardInterrupt, Terminated) as e:
        why = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted by the user (Ctrl-C)"
        run.update(status="interrupted", ended_at=now(), error=why)
        if run.writable:
            print(f"{run.dir}: {why}; {resume_hint(run.dir)}", file=sys.stderr, flush=True)
        raise
    except BaseException as e:
        full = disk_full(e)
        if run.created and not run.began and run.writable:
            # Nothing trained: a model that failed to load or a setting refused leaves no run folder behind.
            import shutil

            shutil.rmtree(run.dir, ignore_errors=True)
        elif full and run.writable:
            raise _out_of_disk(run, exp) from e
        else:
            run.update(status="failed", ended_at=now(), error=f"{type(e).__name__}: {e}".splitlines()[0])
        if full:
            raise TunelabError(f"{run.dir}: no space left on its disk before training began; free space there") from e
        raise
    finally:
        run.close()


def _out_of_disk(run: Run, exp: Experiment) -> TunelabError:
    """A run whose disk filled: the checkpoint being written is removed (cut short, resume would pass over it; its
    bytes let the manifest record the failure), and the one line says how to go on from the last complete one."""
    import shutil

    from tunelab.plan import human_bytes
    from tunelab.runs import complete, free_bytes

    cut = [c for c in checkpoints(run.dir) if not complete(c)]
    for c in cut:
        shutil.rmtree(c, ignore_errors=True)
    error = "no space left on device" + (f" while writing {cut[-1].name}" if cut else "")
    try:
        run.update(status="failed", ended_at=now(), error=error)
    except OSError:
        pass  # still full: the manifest keeps "running"; the lock is free, so --resume takes the run over
    return TunelabError(
        f"{run.dir}: {error}; {human_bytes(free_bytes(run.dir) or 0)} is free there now. Free space (or lower "
        f"train.save_total_limit, now {exp.train.save_total_limit}) and run the same `tunelab train` with --resume: "
        f"it goes on {_resumes_from(run)}"
    )


def _resumes_from(run: Run) -> str:
    """Where `--resume` would go on from: the newest complete checkpoint."""
    last = last_checkpoint(run.dir) if run.writable else None
    return f"from {last.name}" if last else "from the start (no checkpoint is complete)"


def _compile_failure(error: Exception) -> ConfigError | None:
    """A failure inside torch.compile (Dynamo or Inductor) as the one line that says which setting to turn off."""
    if not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ConfigError(
        f"train.compile: torch.compile failed on this model ({type(error).__name__}: {first}); set train.compile: "
        "false to train without it"
    )


def _out_of_memory(error: Exception, exp: Experiment, hw, steps: int, run: Run) -> TunelabError | None:
    """Running out of device memory mid-run as one line: how far it got, and the settings that make it fit. Those
    that change only how the run computes go on from the last checkpoint with --resume (runs.HOW_IT_RUNS)."""
    import re

    import torch

    from tunelab.methods import get_method
    from tunelab.methods.common import batching

    text = str(error)
    oom = isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )
    if not oom:
        return None
    asked = re.search(r"(?:Tried|tried) to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    what = f"{hw.device} ran out of memory after {steps} optimizer steps" + (
        f" (it asked for {asked.group(1)} more)" if asked else ""
    )
    per_forward = batching(exp.train, exp.method).per_forward
    splits = get_method(exp.method).padding_free  # SFT splits a step's examples into forward passes
    fixes = ["set train.gradient_checkpointing: on"] if not hw.gradient_checkpointing else []
    if per_forward > 1 and splits:
        fixes.append(f"lower train.micro_batch_size (now {per_forward})")
    if fixes:
        return TunelabError(
            f"{run.dir}: {what}; {' or '.join(fixes)}, and run the same `tunelab train` with --resume (these "
            f"change how it computes, not what): it goes on {_resumes_from(run)}"
        )
    others = [f"lower train.max_length (now {exp.train.max_length})"]
    if per_forward > 1:
        others.insert(0, f"lower train.batch_size (now {per_forward}), raising train.grad_accumulation to match")
    others += ["train fewer parameters", "load the base in 4 bits (model.quantization: {bits: 4}, LoRA)"]
    return TunelabError(
        f"{run.dir}: {what}, with gradient checkpointing on; {', '.join(others[:-1])} or {others[-1]}; these change "
        "the experiment: start again with --overwrite or --name"
    )


@contextlib.contextmanager
def _checkpoints_in_model_layout(model, applies: bool) -> Iterator[None]:
    """While it trains, a model's Trainer checkpoints keep its own tensor layout.

    Transformers 5 saves a model in its hub layout, undoing the conversions `from_pretrained` applied (a MoE model's
    fused experts are written one by one, Qwen2.5-VL's weights under their old names), but the Trainer reloads a
    checkpoint with a plain `load_state_dict`, without converting back: a resumed partial or full run's converted
    weights would silently restart from the base (huggingface/transformers#48805, #43701; reproduced on Qwen3-MoE).
    An empty conversion list (the model's own `_weight_conversions`) saves the layout the model holds. The result is
    saved after, with the conversions back: the hub layout, as every other tool reads it.
    """
    if not applies or "_weight_conversions" not in vars(model):
        yield
        return
    hub = model._weight_conversions
    model._weight_conversions = []
    try:
        yield
    finally:
        model._weight_conversions = hub


def _padded_instead(exp: Experiment, architecture: str, refusal: str, says: bool) -> None:
    """Padding-free rows on a model that lets their examples attend to each other would train on the wrong text."""
    why = f"{architecture} {refusal}"
    if exp.train.padding_free == "on":
        raise ConfigError(f"train.padding_free: on, but {why}; set it to auto (padded batches here) or off")
    if says:
        print(f"padding-free batches off: {why}; training on padded batches", flush=True)


def _load_scoped_model(
    base: BaseLoader, exp: Experiment, kind: ScopeKind, init_from: Path | None, tokenizer, encoded: list[Encoded]
):
    """The base (or the init_from run's trained model, to continue it) with exactly the scope's parameters
    trainable; a note when the data uses tokens the base never trained and the scope leaves them frozen."""
    from tunelab.scope import untrained_tokens
    from tunelab.scopes import apply_scope, untrained_warning
    from tunelab.templates import added_ids_used

    start = base.load() if init_from is None else kind.trained(init_from, base, trainable=True)
    plain = start.get_base_model() if hasattr(start, "get_base_model") else start
    untrained = untrained_tokens(plain, added_ids_used(tokenizer, encoded))
    model, resolved = apply_scope(start, exp.scope, tokenizer)
    note = untrained_warning(model, untrained, tokenizer, exp.scope)
    if note:
        resolved.warnings.append(note)
    return model, resolved, note


def _build_trainer(
    exp: Experiment, model, tokenizer, splits, encoded, kind: ScopeKind, hw, run: Run, callbacks, also: dict
):
    """The method's trainer over the prepared inputs; for methods with a reference model, record how it is kept."""
    from tunelab.methods import get_method
    from tunelab.methods.base import TrainerInputs
    from tunelab.methods.preference import reference_strategy
    from tunelab.plan import router_aux_loss

    method = get_method(exp.method)
    weight, _ = router_aux_loss(method, exp.train, model.config)
    if weight != exp.train.router_aux_loss:  # off where TRL cannot compute the config's (plan says so)
        exp = exp.model_copy(update={"train": exp.train.model_copy(update={"router_aux_loss": weight})})
    keeps = method.keeps_reference(exp)
    reference = reference_strategy(method.settings(exp), kind.adds_parameters) if keeps else None
    cache = _ref_cache_dir(exp, run) if reference == "precomputed" and method.caches_reference else None
    if keeps:
        run.update(
            reference=reference,
            ref_logps_cache=str(cache) if cache else None,
            ref_logps_reused=bool(cache and (cache / "train.safetensors").is_file()),
        )
    inputs = TrainerInputs(
        exp, model, tokenizer, splits, encoded, hw, run.checkpoints, callbacks, reference, cache, also
    )
    trainer = method.build(inputs)
    if hw.master == "params":
        _trainable_in_float32(trainer.model)
    if exp.scope.lora is not None and exp.scope.lora.loraplus_ratio:
        from tunelab.scopes.lora import loraplus_optimizer

        trainer.optimizer = loraplus_optimizer(trainer, exp.scope.lora.loraplus_ratio)  # the Trainer then uses it
    return trainer


def _trainable_in_float32(model) -> None:
    """Float32 master weights: every trainable tensor in float32 on a half-precision or quantized base, the forward
    under autocast (the Trainer's bf16/fp16), as accelerate does under FSDP2 and PEFT does for adapters.

    In bfloat16 an AdamW update smaller than half the precision at a weight is lost: at a learning rate of 5e-6
    (train_partial_ft.py's) ten steps moved 7.5% of the elements of a weight matrix of scale 0.02, against all of
    them in float32 (docs/memory.md). TRL's SFT trainer casts QLoRA adapters to bfloat16 (the QLoRA paper's
    choice), but a resumed run reloads its checkpoint's adapter in float32 (PEFT's load), so the two would train
    different numbers. The optimizer is created later, in `train()`, over these float32 parameters.
    """
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)


def _ref_cache_dir(exp: Experiment, run: Run) -> Path:
    """Where precomputed reference log-probs live: one folder per (starting model, data, template, length)."""
    import json

    from tunelab.builtin import cache_root

    m = run.manifest
    init = None
    if m.init_from:
        source = read_manifest(Path(m.init_from))
        init = [source.config_hash, source.ended_at]
    key = {
        "base": m.base_model.fingerprint,
        "init": init,
        "data": m.data.hashes,
        "template": m.chat_template_hash,
        "max_length": exp.train.max_length,
        "dtype": m.dtype,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "ref-logps" / digest


def _preference_accuracy(exp: Experiment, trainer, tokenizer, splits) -> float | None:
    """Share of held-out pairs where the model prefers the chosen answer (preference methods with paired eval data):
    by its answers' log-probabilities, or by the method's own measure (a reward model's scores)."""
    from tunelab.methods import get_method

    method = get_method(exp.method)
    pairs = [r for r in splits.eval.rows if "chosen" in r] if splits.eval else []
    if not method.preference or not pairs:
        return None
    if method.pair_accuracy is not None:
        return method.pair_accuracy(trainer)
    from tunelab.methods.preference import preference_accuracy
    from tunelab.templates import template_vars

    variables = template_vars(exp.tokenizer, tokenizer)
    return preference_accuracy(trainer.model, tokenizer, pairs, exp.tokenizer.fold_system, variables)


def _train_in(
    run: Run,
    inputs: Inputs,
    init_from: Path | None,
    provenance: Provenance,
    callbacks: list[TrainerCallback],
    group: str,
) -> TrainResult:
    import torch

    from tunelab import trackers
    from tunelab.methods import get_method
    from tunelab.methods.common import Hardware, batching, packed_rows_refusal
    from tunelab.models import pick_device, pick_dtype
    from tunelab.plan import estimate_memory, model_facts
    from tunelab.scopes import BaseLoader, get_scope
    from tunelab.scopes.lora import run_eva, waits_for_eva

    exp, splits, tokenizer, engine = inputs.exp, inputs.splits, inputs.tokenizer, inputs.engine
    device = pick_device(exp.model.device)
    dtype = pick_dtype(exp.model.dtype, device)
    torch.manual_seed(exp.train.seed)
    kind = get_scope(exp.scope.kind)
    dtype_name = str(dtype).removeprefix("torch.")
    clock = _phases(run.writable)
    clock(f"loading {init_from or exp.model.id} on {device} ({dtype_name})")
    base = BaseLoader(exp.model, dtype, device, inputs.config, provenance.base_model.path, model_head(exp.method))
    model, resolved, note = _load_scoped_model(base, exp, kind, init_from, tokenizer, inputs.encoded)
    if note and run.writable:
        print(f"warning: {note}", flush=True)
    facts = model_facts(exp.model.id, model)
    memory = estimate_memory(facts, resolved, exp, dtype_name, device, engine)
    refusal = packed_rows_refusal(model, tokenizer) if batching(exp.train, exp.method).padding_free else None
    apart = refusal is None
    if refusal is not None:
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        _padded_instead(exp, type(base_model).__name__, refusal, run.writable)
    run.update(
        **provenance.model_dump(),
        device=device,
        dtype=dtype_name,
        gradient_checkpointing=memory.gradient_checkpointing,
        batching=asdict(batching(exp.train, exp.method, apart)),
        trainable_params=resolved.trainable_params,
        total_params=resolved.total_params,
        trainable_percent=round(resolved.trainable_percent, 6),
        target_modules=resolved.target_modules,
        layers=resolved.layers,
        adapter=resolved.adapter or None,
        scope_notes=resolved.warnings or None,
        estimated_memory_bytes=memory.total_bytes,
    )
    before = _digests(dict(model.named_parameters()))
    # FSDP checkpoints activations itself when its config says so; the Trainer refuses both at once.
    trainer_checkpointing = memory.gradient_checkpointing and not (engine and engine.checkpoints_activations)
    hw = Hardware(device, dtype, trainer_checkpointing, packed_rows_apart=apart, master=memory.master)
    recorder = _recorder(run, sys.stdout.isatty())
    # Before the recorder, whose check of the weights every checkpoint waits on.
    timed = [_timed_checkpoints(exp.train.save_minutes, exp.steps_per_sampling)] if exp.train.save_minutes else []
    report_to = exp.train.report_to
    if report_to:
        facts = {"config_hash": exp.config_hash(), "run_name": run.dir.name, "base_model": exp.model.id}
        facts |= {"trainable_params": resolved.trainable_params, "total_params": resolved.total_params}
        facts["estimated_memory_bytes"] = memory.total_bytes
        params = trackers.run_params(exp.model_dump(mode="json"), facts)
        callbacks = [*callbacks, trackers.TrackerRecord(report_to, run.dir, params, get_method(exp.method).held_out)]
    if get_method(exp.method).generates:
        from tunelab.methods.online import rollout_keeper

        callbacks = [*callbacks, rollout_keeper(run.checkpoints / "completions", run.dir / ROLLOUTS)]
    if exp.train.early_stop is not None and splits.eval:
        from transformers import EarlyStoppingCallback

        callbacks = [*callbacks, EarlyStoppingCallback(early_stopping_patience=exp.train.early_stop)]
    with trackers.environment(report_to, run.dir, group):
        clock(f"preparing the {exp.method} trainer")
        trainer = _build_trainer(
            exp, model, tokenizer, splits, inputs.encoded, kind, hw, run, [*timed, recorder, *callbacks], inputs.also
        )
        trainer.args.run_name, trainer.args.project = run.dir.name, group  # the trackers' run and project names
        running = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
        distributed.check_launch(trainer.args.world_size, engine, running)
        checkpoint = last_checkpoint(run.dir) if run.resuming else None
        if checkpoint is not None and run.writable:
            print(f"resuming from {checkpoint.name}{_drop_incomplete(run, checkpoint)}", flush=True)
        if checkpoint is None and waits_for_eva(model):
            clock("initialising the adapter from its layers' inputs on the training batches (EVA)")
            run_eva(trainer)
        # The untrained eval loss, measured inside train() (after the model is wrapped for DDP/FSDP) on a fresh run.
        trainer.args.eval_on_start = bool(splits.eval) and checkpoint is None
        if checkpoint is None:
            run.update(preference_accuracy_before=_preference_accuracy(exp, trainer, tokenizer, splits))
        else:
            run.trim_after(checkpoint_step(checkpoint))
        clock("training")
        started = time.perf_counter()
        with _checkpoints_in_model_layout(model, not kind.adds_parameters):
            if checkpoint is not None and _finished(checkpoint):
                _load_finished(trainer, checkpoint)
                runtime = None  # nothing trained in this process
            else:
                try:
                    resume = str(checkpoint) if checkpoint else None
                    runtime = trainer.train(resume_from_checkpoint=resume).metrics.get("train_runtime")
                except Exception as e:
                    failure = _compile_failure(e) if exp.train.compile else None
                    failure = failure or _out_of_memory(e, exp, hw, trainer.state.global_step, run)
                    if failure is None:
                        raise
                    raise failure from e
    if recorder.bad is not None:
        raise NonFiniteLoss(
            f"training stopped: {recorder.bad} at step "
            f"{trainer.state.global_step}; lower train.learning_rate (last good checkpoint: "
            f"{last_checkpoint(run.dir)})"
        )
    held_out = get_method(exp.method).held_out  # what the eval data measures: loss, or GRPO's reward
    final_eval = _final_eval(trainer, f"eval_{held_out}") if splits.eval else None
    sharded = running in distributed.SHARDED
    rank_digests = distributed.check_synced(trainer.model, resolved.trainable_names, sharded)
    accuracy_after = _preference_accuracy(exp, trainer, tokenizer, splits)  # every rank: a collective if sharded
    state = trainer.accelerator.get_state_dict(trainer.model)  # gathered onto the first process if sharded
    if not run.writable:
        return TrainResult(run.dir, run.manifest)
    after = _digests({n: state[n] for n in before if n in state})
    if not kind.adds_parameters:  # opened original weights are saved in the model's dtype, as the base is
        opened = set(resolved.trainable_names)
        state = {n: t.to(dtype) if n in opened and t.is_floating_point() else t for n, t in state.items()}
    clock(f"saving the {kind.result} to {run.dir}")
    kind.save(trainer.model, state, resolved.trainable_names, run.dir)
    tokenizer.save_pretrained(run.dir / TOKENIZER)
    check = _change_check(before, after, resolved.trainable_names, trainer.state.global_step)
    train_losses = [r["loss"] for r in read_metrics(run.dir) if "loss" in r]
    peak, measure = peak_memory(device)
    run.update(
        status="completed",
        ended_at=now(),
        result=kind.result,
        base_eval_loss=_base_eval(trainer, "eval_loss") if held_out == "loss" else None,
        final_eval_loss=final_eval if held_out == "loss" else None,
        base_eval_reward=_base_eval(trainer, "eval_reward") if held_out == "reward" else None,
        final_eval_reward=final_eval if held_out == "reward" else None,
        eval_also_losses=_also_losses(trainer, list(splits.also)),
        final_train_loss=train_losses[-1] if train_losses else None,
        global_steps=trainer.state.global_step,
        stopped_early=trainer.state.global_step < trainer.state.max_steps,
        best_step=trainer.state.best_global_step if exp.train.keep == "best" else None,
        best_eval_loss=trainer.state.best_metric if exp.train.keep == "best" and held_out == "loss" else None,
        train_seconds=round(time.perf_counter() - started, 2),
        train_runtime=runtime,
        tokens_seen=trainer.state.num_input_tokens_seen if trainer.args.include_num_input_tokens_seen != "no" else None,
        change_check=check,
        preference_accuracy_after=accuracy_after,
        peak_memory_bytes=peak,
        peak_memory_measure=measure,
        distributed={
            "world_size": distributed.world_size(),
            "engine": running,
            **(engine.provenance() if engine else {}),
            "rank_digests": rank_digests,
        },
    )
    if not check["ok"]:
        print(f"warning: {change_warning(check, trainer.state.log_history)}", file=sys.stderr)
    return TrainResult(run.dir, run.manifest)


def change_warning(check: dict, logged: list[dict]) -> str:
    """One line on what the tensor change check found, and where GRPO's rewards gave it nothing to learn from (every
    group of replies scored alike at every step: TRL's frac_reward_zero_std 1), that this is why."""
    said = []
    if frozen := check["frozen_changed"]:
        said.append(f"{len(frozen)} frozen tensors changed ({frozen[0]}{', ...' if len(frozen) > 1 else ''})")
    if unchanged := check["trainable_unchanged"]:
        total = len(unchanged) + check["trainable_changed"]
        said.append(f"{len(unchanged)} of {total} trained tensors did not change ({unchanged[0]}, ...)")
    line = "tensor change check failed: " + "; ".join(said)
    flat = [r["frac_reward_zero_std"] for r in logged if "frac_reward_zero_std" in r]
    if unchanged and flat and min(flat) == 1:
        line += (
            "; every group of replies scored alike at every step (frac_reward_zero_std 1), so GRPO had no reward "
            "differences to learn from: check the rewards on replies the model gives, or raise grpo.generations or "
            "grpo.temperature"
        )
    return line
