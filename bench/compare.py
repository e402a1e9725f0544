"""tunelab compare vs the compare_lora.py way, on the same adapters and prompts, in one process.

The naive way reloads the base for every adapter and generates one prompt at a time; tunelab loads
the base once and generates mixed-adapter batches. Both decode greedily; the outputs must be equal.

    .venv/bin/python bench/compare.py [--adapters 4] [--prompts 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_runs(out: Path, n: int) -> list[Path]:
    from tunelab.config import load_experiment
    from tunelab.train import train

    variants = ["lora-qv", "lora-qkvo", "lora-all-linear", "lora-last-half"]
    runs = []
    for i in range(n):
        exp = load_experiment(
            REPO / "examples" / f"{variants[i % 4]}.yaml",
            [f"output.dir={out}", f"output.name=a{i}", "train.max_steps=30", f"train.seed={i}"],
        )
        runs.append(train(exp).run_dir)
    return runs


def naive(runs: list[Path], prompts, max_new_tokens: int) -> dict[str, list[str]]:
    """compare_lora.py: for each adapter, load the base, attach the adapter, one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.compare import generate
    from tunelab.models import model_path
    from tunelab.runs import load_run_experiment, read_manifest

    outputs = {}
    base_path = model_path(load_run_experiment(runs[0]).model.id)
    for run in runs:
        tok = AutoTokenizer.from_pretrained(run / "tokenizer")
        tok.padding_side = "left"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(run / "adapter")).eval()
        outputs[read_manifest(run).name] = [generate(model, tok, [p], None, max_new_tokens, 1)[0] for p in prompts]
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TUNELAB_HOME", str(REPO / ".tunelab-cache"))
    import torch

    from tunelab.compare import compare, read_prompts

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp) / "runs", args.adapters)
        lines = (REPO / "examples" / "data" / "prompts.jsonl").read_text().splitlines()
        rows = [json.loads(lines[i % len(lines)]) for i in range(args.prompts)]
        prompt_path = Path(tmp) / "prompts.jsonl"
        prompt_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompts = read_prompts(prompt_path)

        start = time.perf_counter()
        slow = naive(runs, prompts, args.max_new_tokens)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = compare(
            runs, include_base=False, prompts_file=prompt_path, max_new_tokens=args.max_new_tokens, batch_size=64
        )
        tunelab_s = time.perf_counter() - start
    identical = all(fast.outputs[name] == outs for name, outs in slow.items())
    print(f"adapters={args.adapters} prompts={args.prompts} max_new_tokens={args.max_new_tokens}")
    print(f"naive (reload base per adapter, one prompt at a time): {naive_s:.2f} s")
    print(f"tunelab compare (base once, mixed-adapter batches, + eval loss): {tunelab_s:.2f} s")
    print(f"speed-up: {naive_s / tunelab_s:.2f}x   identical outputs: {identical}")
    if not identical:
        for name, outs in slow.items():
            diff = sum(a != b for a, b in zip(outs, fast.outputs[name], strict=True))
            print(f"  {name}: {diff} of {len(outs)} outputs differ")


if __name__ == "__main__":
    main()
