"""The GPU benchmark: LoRA SFT on Llama-3.1-8B built from its config with random bf16 weights (no download).

Measures, in one process, and writes bench.json and bench.md to the folder given by --out:
  1. speed: the plain TRL script (TRL's defaults: bf16, activation checkpointing, padded random batches),
     tunelab with the plain script's settings, and tunelab's defaults (checkpointing from the memory plan,
     length-balanced padding-free forward passes); LoRA r16 all-linear, the same varied-length chats, seed and
     steps. Real (non-pad) tokens per second of the training steps alone, MFU, and the final train loss.
  2. memory: plan's estimate against torch.cuda.max_memory_allocated for LoRA, QLoRA (4-bit NF4) and partial
     fine-tuning of the last 4 blocks + final norm + lm_head.
  3. compile: tunelab's defaults with train.compile (torch.compile): the first step's seconds (compilation) and
     the steady rate after it. Run after the others only if they finish within COMPILE_START_BY_S; alone with
     --stages compile.
Every figure is written to bench.json as soon as it is measured, so a run cut short keeps what it measured.

MFU counts 6 x P x tokens model FLOPs a step (P: the base's parameters; the PaLM convention, which also counts
the frozen weights' gradients LoRA skips; attention's sequence-length term is left out) against the GPU's dense
bf16 peak (989 TFLOP/s for H100/H200 SXM, or --peak-tflops).

    bench/gpu/fetch-wheels.sh                      # here, once: the wheels the GPU machine lacks, into .whl/
    bench/gpu/run.sh OUT                           # on the GPU machine: install them, then this script
    bench/gpu/run.sh OUT --stages compile          # on the GPU machine, if the first run skipped compile
    .venv/bin/python bench/gpu/bench.py --smoke --out /tmp/smoke   # CPU, tiny config, 3 steps: CI runs this
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
LLAMA_8B = REPO / "tests" / "fixtures" / "configs" / "llama-3.1-8b-instruct"
TOKENIZER = Path(__file__).resolve().parent / "tokenizer"  # the built-in tiny-chat tokenizer: ids are all it needs
H100_H200_BF16_TFLOPS = 989.0
ON_OFF = {True: "on", False: "off"}


def build_model(folder: Path, smoke: bool) -> int:
    """Llama-3.1-8B (or, for --smoke, a tiny Llama) with random weights, saved as a model folder; its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if smoke:
        config = LlamaConfig(
            vocab_size=875,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        dtype, device = torch.float32, "cpu"
    else:
        config = AutoConfig.from_pretrained(LLAMA_8B)
        dtype, device = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    for item in TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    params = sum(p.numel() for p in model.parameters())
    del model
    release()
    return params


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tunelab_experiment(model_dir: Path, train_file: Path, out: Path, name: str, steps: int, smoke: bool, *extra: str):
    from tunelab.config import load_experiment

    return load_experiment(
        REPO / "examples" / "lora-all-linear.yaml",
        [
            f"model.id={model_dir}",
            f"model.device={'cpu' if smoke else 'cuda'}",
            f"data.train={train_file}",
            "data.eval=null",
            f"output.dir={out}",
            f"output.name={name}",
            f"train.max_steps={steps}",
            f"train.max_length={512 if smoke else 1024}",
            "train.learning_rate=2e-4",
            "scope.lora.dropout=0.0",
            "train.logging_steps=1",
            f"train.save_steps={steps}",  # one checkpoint, after the last step: outside the clock
            *extra,
        ],
    )


def warm_up_steps(steps: int) -> int:
    """Steps left out of the steady rate: the first ones warm up (and, with train.compile, compile)."""
    return min(3, steps // 2)


def tunelab_speed(model_dir: Path, train_file: Path, out: Path, name: str, steps: int, smoke: bool, *extra: str):
    from bench.train import StepClock, final_train_loss, steady_tokens_per_second, tokens_per_second
    from tunelab.train import train

    release()
    clock = StepClock()
    result = train(tunelab_experiment(model_dir, train_file, out, name, steps, smoke, *extra), callbacks=[clock])
    m = result.manifest
    return {
        "tokens_per_s": tokens_per_second(clock),
        "steady_tokens_per_s": steady_tokens_per_second(clock, warm_up_steps(steps)),
        "first_step_s": clock.ends[0] - clock.start,
        "final_loss": final_train_loss(clock),
        "seconds": clock.end - clock.start,
        "tokens": max(r.get("num_tokens", 0) for r in clock.state.log_history),
        "gradient_checkpointing": m.gradient_checkpointing,
        "estimated_bytes": m.estimated_memory_bytes,
        "peak_bytes": m.peak_memory_bytes,
    }


def plain_speed(model_dir: Path, train_file: Path, out: Path, steps: int, smoke: bool) -> dict:
    import torch

    from bench.train import plain_trl

    release()
    tokens_per_s, loss = plain_trl(
        str(model_dir),
        train_file,
        None,
        out,
        steps,
        gpu=not smoke,
        learning_rate=2e-4,
        max_length=512 if smoke else 1024,
        logging_steps=1,
    )
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"tokens_per_s": tokens_per_s, "final_loss": loss, "peak_bytes": peak}


def memory_check(model_dir: Path, train_file: Path, out: Path, name: str, smoke: bool, *extra: str) -> dict:
    """Plan's estimate against the measured peak, over a few steps of the scope."""
    from tunelab.plan import make_plan
    from tunelab.train import train

    exp = tunelab_experiment(model_dir, train_file, out, name, 3, smoke, *extra)
    estimate = make_plan(exp).memory.total_bytes
    release()
    m = train(exp).manifest
    peak = m.peak_memory_bytes
    return {
        "estimated_bytes": estimate,
        "peak_bytes": peak,
        "error": (estimate / peak - 1) if peak else None,
        "gradient_checkpointing": m.gradient_checkpointing,
    }


def attempt(measure, *args: object) -> dict:
    """One row's figures, or why it failed in one line: a lent GPU's minutes are not lost to one row that breaks."""
    try:
        return measure(*args)
    except Exception as e:  # noqa: BLE001 - the rows measured before and after it still count
        release()
        return {"failed": f"{type(e).__name__}: {str(e).strip()}".splitlines()[0][:300]}


def markdown(results: dict) -> str:
    gib = 1 << 30
    lines = [
        f"GPU benchmark, {results['hardware']}, {results['date']}: LoRA r16 all-linear SFT on "
        f"{results['model']} ({results['parameters']:,} parameters, random weights), "
        f"{results['steps']} steps of 8 varied-length chats, max_length {results['max_length']}; steady: the steps "
        f"after the first {warm_up_steps(results['steps'])}.",
        "",
        "| run | tokens/s | vs plain TRL | steady tokens/s | MFU | first step | final loss | checkpointing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = results["speed"].get("plain-trl", {}).get("tokens_per_s")
    for name, r in results["speed"].items():
        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed']} |")
            continue
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "-"
        ratio = f"{r['tokens_per_s'] / plain:.2f}x" if plain else "-"
        steady = f"{r['steady_tokens_per_s']:,.0f}" if r.get("steady_tokens_per_s") else "-"
        first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {ratio} | {steady} | {mfu} | {first} | {r['final_loss']:.4f} | "
            f"{ON_OFF.get(r.get('gradient_checkpointing'), 'on (TRL default)')} |"
        )
    skipped = [f"{name}: skipped ({why})" for name, why in results.get("skipped", {}).items()]
    lines += ["", *skipped] if skipped else []
    lines += ["", "| scope | plan's estimate | measured peak | error |", "|---|---|---|---|"]
    for name, r in results["memory"].items():
        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed']} |")
            continue
        peak = f"{r['peak_bytes'] / gib:.2f} GiB" if r["peak_bytes"] else "-"
        error = f"{r['error'] * 100:+.1f}%" if r["error"] is not None else "-"
        lines.append(f"| {name} | {r['estimated_bytes'] / gib:.2f} GiB | {peak} | {error} |")
    return "\n".join(lines) + "\n"


STAGES = ("speed", "memory", "compile")
COMPILE_START_BY_S = 300  # run.sh gives the whole run 480 s; compiling an 8B model takes minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny Llama on CPU, 3 steps: the script's own test")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=H100_H200_BF16_TFLOPS)
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated, of speed, memory, compile (train.compile's speed; when asked alone, whatever the "
        f"clock; with the others, only if they finish within {COMPILE_START_BY_S} s)",
    )
    args = parser.parse_args()
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES):
        raise SystemExit(f"--stages: each of {', '.join(STAGES)}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    steps = args.steps or (2 if args.smoke else 20)
    work = Path(os.environ.get("TUNELAB_BENCH_WORK", "/tmp/tunelab-gpu-bench"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("TUNELAB_HOME", str(work / "home"))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from bench.train import varied_chats

    model_dir = work / "model"
    params = build_model(model_dir, args.smoke)
    train_file = work / "train.jsonl"
    varied_chats(train_file, 8 * steps + 64, seed=0)
    print(f"built the model ({params:,} parameters) in {time.perf_counter() - started:.0f} s", flush=True)
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU",
        "model": "tiny Llama (smoke)" if args.smoke else "Llama-3.1-8B (config only)",
        "parameters": params,
        "steps": steps,
        "max_length": 512 if args.smoke else 1024,
        "flops_per_token": f"6 x {params}",
        "peak_tflops": None if args.smoke else args.peak_tflops,
        "speed": {},
        "memory": {},
        "skipped": {},
    }
    peak_flops = args.peak_tflops * 1e12

    def speed(name: str, measured: dict) -> None:
        if "failed" not in measured:
            rate = measured.get("steady_tokens_per_s") or measured["tokens_per_s"]
            measured["mfu"] = None if args.smoke else 6 * params * rate / peak_flops
        results["speed"][name] = measured
        write(results, args.out, started)  # each figure kept as it comes, whatever stops the run later

    runs = work / "runs"
    if "speed" in stages:
        speed("plain-trl", attempt(plain_speed, model_dir, train_file, work / "plain", steps, args.smoke))
        equal = ["train.gradient_checkpointing=on", "train.padding_free=off", "train.micro_batch_size=8"]
        speed("tunelab-equal", attempt(tunelab_speed, model_dir, train_file, runs, "equal", steps, args.smoke, *equal))
        speed("tunelab", attempt(tunelab_speed, model_dir, train_file, runs, "default", steps, args.smoke))

    if "memory" in stages:
        memory = results["memory"]
        if "tokens_per_s" in results["speed"].get("tunelab", {}):
            keys = ("estimated_bytes", "peak_bytes", "gradient_checkpointing")
            lora = memory["lora"] = {k: results["speed"]["tunelab"][k] for k in keys}
            lora["error"] = lora["estimated_bytes"] / lora["peak_bytes"] - 1 if lora["peak_bytes"] else None
        quantized = "model.quantization={bits: 4}"
        memory["qlora"] = attempt(memory_check, model_dir, train_file, runs, "qlora", args.smoke, quantized)
        write(results, args.out, started)
        partial = "scope={partial: {last_blocks: 4, norm: true, lm_head: true}}"
        memory["partial-last4"] = attempt(
            memory_check, model_dir, train_file, runs, "partial", args.smoke, partial, "train.learning_rate=5e-6"
        )
        write(results, args.out, started)

    if "compile" in stages:
        elapsed = time.perf_counter() - started
        if stages == ["compile"] or elapsed < COMPILE_START_BY_S:
            compiled = attempt(
                tunelab_speed, model_dir, train_file, runs, "compile", steps, args.smoke, "train.compile=true"
            )
            speed("tunelab-compile", compiled)
        else:
            results["skipped"]["tunelab-compile"] = f"{elapsed:.0f} s had passed; run it alone: --stages compile"
    write(results, args.out, started)
    print(markdown(results), flush=True)
    print(f"done in {results['seconds']} s -> {args.out}")


def write(results: dict, out: Path, started: float) -> None:
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
