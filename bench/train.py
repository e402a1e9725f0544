"""tunelab train vs a plain TRL script (the way train_lora.py is written), in one session.

Same built-in model, data, seed, LoRA and steps, on chats whose replies vary from a few to a few
hundred tokens. Prints real (non-pad) tokens per second of the training steps alone (from the first
step to the last; evaluations and checkpoints, which tunelab does and the plain script does not, fall
outside) and the final eval loss, for:
  1. plain:          SFTTrainer with TRL's defaults (activation checkpointing on, padded random batches);
  2. tunelab-equal:  tunelab with the plain script's settings (checkpointing on, one padded forward pass
                     per step of 8 random examples): its overhead;
  3. tunelab:        tunelab's defaults: checkpointing from the memory plan, each step's 8 random
                     examples in 4 length-balanced padding-free forward passes;
  4. tunelab-grouped: padded length-grouped batches (fast, but not a random mix: compare the loss).
Repeat i runs every setting with seed 42 + i, interleaved (the order rotates), so the spread of the
final eval loss over repeats is the seed noise that a loss difference must be judged against. The
ratio of each repeat is against that repeat's plain run. Also times `tunelab --help` and `tunelab
plan` on a config-only Llama-3.1-8B folder.

    .venv/bin/python bench/train.py [--steps 40] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def varied_chats(path: Path, n: int, seed: int = 0) -> None:
    from tunelab import tinyworld

    rng = random.Random(seed)
    sentences = [s for p in tinyworld.pretrain_corpus() for s in p.split(". ")]
    rows = []
    for _ in range(n):
        reply = ". ".join(rng.sample(sentences, rng.choice([1, 2, 4, 8, 16, 32, 48]))) + "."
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Tell me about the tiny world."},
                    {"role": "assistant", "content": reply},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class StepClock:
    """Times the training steps alone: from the first step's start to the last step's end.

    An evaluation before the first step (tunelab's untrained eval loss) or after the last falls outside.
    """

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            start: float | None = None

            def on_step_begin(self, args, state, control, **kw):
                if self.start is None:
                    self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.end = time.perf_counter()
                self.ends.append(self.end)
                self.state = state

        clock = _Clock()
        clock.ends = []  # each step's end
        return clock


def tokens_per_second(clock) -> float:
    tokens = max(r.get("num_tokens", 0) for r in clock.state.log_history)
    return tokens / (clock.end - clock.start)


def steady_tokens_per_second(clock, after: int) -> float:
    """Tokens per second of the steps after the first `after` (warm-up, compilation), from the per-step token counts
    the trainer logs (logging_steps=1)."""
    seen = {r["step"]: r["num_tokens"] for r in clock.state.log_history if "num_tokens" in r}
    return (seen[len(clock.ends)] - seen[after]) / (clock.ends[-1] - clock.ends[after - 1])


def plain_trl(
    model_dir: str,
    train_file: Path,
    eval_file: Path | None,
    out: Path,
    steps: int,
    seed: int = 42,
    gpu: bool = False,
    learning_rate: float = 2e-3,
    max_length: int = 512,
    logging_steps: int = 5,
) -> tuple[float, float]:
    """What train_lora.py does: load, LoraConfig, SFTTrainer with TRL's defaults (on a GPU: bf16 and activation
    checkpointing; a CPU needs bf16 off). Returns tokens/s and the final eval loss (train loss without eval data)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    files = {"train": str(train_file), **({"eval": str(eval_file)} if eval_file else {})}
    data = load_dataset("json", data_files=files)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        max_length=max_length,
        seed=seed,
        **({} if gpu else {"bf16": False, "use_cpu": True}),
        report_to="none",
        save_strategy="no",
        assistant_only_loss=True,
        logging_steps=logging_steps,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    if eval_file is None:
        return tokens_per_second(clock), final_train_loss(clock)
    return tokens_per_second(clock), trainer.evaluate()["eval_loss"]


def final_train_loss(clock) -> float:
    """The mean of the last five logged training losses."""
    losses = [r["loss"] for r in clock.state.log_history if "loss" in r]
    return statistics.mean(losses[-5:])


def tunelab_run(
    train_file: Path, eval_file: Path, out: Path, steps: int, name: str, *extra: str
) -> tuple[float, float]:
    from tunelab.config import load_experiment
    from tunelab.train import train

    exp = load_experiment(
        REPO / "examples" / "lora-all-linear.yaml",
        [
            f"data.train={train_file}",
            f"data.eval={eval_file}",
            f"output.dir={out}",
            f"output.name={name}",
            f"train.max_steps={steps}",
            "train.max_length=512",
            "scope.lora.dropout=0.0",
            "train.logging_steps=5",
            # evaluate and checkpoint only after the last step, outside the clock
            f"train.eval_steps={steps}",
            f"train.save_steps={steps}",
            *extra,
        ],
    )
    clock = StepClock()
    result = train(exp, callbacks=[clock])
    return tokens_per_second(clock), result.manifest.final_eval_loss


def cli_seconds(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("TUNELAB_HOME", str(REPO / ".tunelab-cache"))
    from tunelab.builtin import materialise

    model_dir = str(materialise("tiny-chat"))
    settings = {
        "tunelab-equal": ["train.gradient_checkpointing=on", "train.padding_free=off", "train.micro_batch_size=8"],
        "tunelab": [],
        "tunelab-grouped": ["train.padding_free=off", "train.group_by_length=true"],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ["plain", *settings]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
        varied_chats(train_file, 400, seed=0)
        varied_chats(eval_file, 40, seed=1)
        # Warm-up: the first training in a process pays one-off costs (allocator, thread pools, TRL set-up).
        plain_trl(model_dir, train_file, eval_file, tmp_path / "warm", 3)
        for i in range(args.repeats):
            runs = {
                "plain": lambda i=i: plain_trl(
                    model_dir, train_file, eval_file, tmp_path / f"plain{i}", args.steps, seed=42 + i
                ),
                **{
                    name: lambda i=i, name=name, extra=extra: tunelab_run(
                        train_file,
                        eval_file,
                        tmp_path / "runs",
                        args.steps,
                        f"{name}{i}",
                        *extra,
                        f"train.seed={42 + i}",
                    )
                    for name, extra in settings.items()
                },
            }
            # Rotate the order each repeat so no setting always runs first (or last) in the process.
            names = list(runs)
            k = i % len(names)
            for name in names[k:] + names[:k]:
                results[name].append(runs[name]())
    print(f"steps={args.steps} repeats={args.repeats} batch=8 max_length=512 (replies of 1-48 sentences)")
    plain_loss = statistics.mean(r[1] for r in results["plain"])
    for name, rows in results.items():
        speed = statistics.median(r[0] for r in rows)
        ratios = [r[0] / p[0] for r, p in zip(rows, results["plain"], strict=True)]
        losses = [r[1] for r in rows]
        loss = statistics.mean(losses)
        print(
            f"{name:16s} {speed:8.0f} tok/s   ratio {statistics.median(ratios):5.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f})   final eval loss {loss:.4f} "
            f"(seeds {min(losses):.4f}-{max(losses):.4f}; {(loss / plain_loss - 1) * 100:+.2f}% vs plain)"
        )
    print(f"tunelab --help: {cli_seconds('--help'):.2f} s")
    exp = REPO / "bench" / "llama8b-plan.yaml"
    print(f"tunelab plan (config-only Llama-3.1-8B): {cli_seconds('plan', str(exp)):.2f} s")


if __name__ == "__main__":
    main()
