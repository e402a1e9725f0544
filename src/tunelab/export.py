"""Export a run as a standard folder that plain Transformers (or PEFT) loads.

LoRA: the adapter alone, or merged into the base (`merge_and_unload`). Partial: the base with the
trained tensors in place. Full: the trained model. Each export carries its provenance.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import ADAPTER, TOKENIZER, now, read_manifest, write_json


def stop_at_terminator(model, tokenizer_dir: Path, terminator: str | None) -> None:
    """List the turn terminator the run was trained to emit among the stop tokens, so plain `generate` ends the
    reply there (a base model's generation_config often names only its EOS, e.g. Gemma's <eos>, not <end_of_turn>)."""
    from transformers import AutoTokenizer

    if not terminator:
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    token_id = tokenizer.convert_tokens_to_ids(terminator)
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if token_id not in ids:
        model.generation_config.eos_token_id = [*ids, token_id]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def export_run(run_dir: Path, out: Path, merge: bool = False) -> Path:
    from tunelab.models import load_trained

    run_dir, out = Path(run_dir), Path(out)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "completed":
        raise TunelabError(f"{run_dir}: run is {manifest.get('status')}; only completed runs can be exported")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out}: exists and is not empty; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if manifest["result"] == ADAPTER and not merge:
        shutil.copytree(run_dir / ADAPTER, tmp)
        kind = "adapter"
    else:
        model = load_trained(run_dir)
        if manifest["result"] == ADAPTER:
            model = model.merge_and_unload()
        stop_at_terminator(model, run_dir / TOKENIZER, (manifest.get("tokens") or {}).get("terminator"))
        model.save_pretrained(tmp)  # safetensors
        kind = "merged" if manifest["result"] == ADAPTER else manifest["scope"]
    for item in (run_dir / TOKENIZER).iterdir():
        shutil.copy2(item, tmp / item.name)
    write_json(
        tmp / "tunelab-export.json",
        {
            "run": str(run_dir.resolve()),
            "run_name": manifest["name"],
            "kind": kind,
            "base_model": manifest["base_model"],
            "config_hash": manifest["config_hash"],
            "exported_at": now(),
        },
    )
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
