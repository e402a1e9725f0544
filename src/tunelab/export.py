"""Export a run as a standard folder that plain Transformers (or PEFT) loads.

What the folder holds is the scope kind's to say (`ScopeKind.export`): LoRA the adapter alone or merged into
the base, partial the base with the trained tensors in place, full the trained model. Each export carries
the run's tokenizer and its provenance, and is written to a temporary name first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs import TOKENIZER, now, read_manifest, write_json


def stop_at_terminator(model, tokenizer_dir: Path, terminator: str | None) -> None:
    """List the turn terminator the run was trained to emit among the stop tokens, so plain `generate` ends the
    reply there (a base model's generation_config often names only its EOS, e.g. Gemma's <eos>, not <end_of_turn>)."""
    from transformers import AutoTokenizer

    from tunelab.templates import stop_token_ids

    if not terminator:
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model.generation_config
    ids = stop_token_ids(config.eos_token_id, [tokenizer.convert_tokens_to_ids(terminator)])
    if ids != stop_token_ids(config.eos_token_id, []):
        config.eos_token_id = ids
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def export_run(run_dir: Path, out: Path, merge: bool = False) -> Path:
    from tunelab.scopes import run_scope

    run_dir, out = Path(run_dir), Path(out)
    manifest = read_manifest(run_dir)
    if manifest.status != "completed":
        raise TunelabError(f"{run_dir}: run is {manifest.status}; only completed runs can be exported")
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out}: exists and is not empty; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    kind, base = run_scope(run_dir, manifest, device="cpu")
    model, written = kind.export(run_dir, tmp, merge, base)
    if model is not None:
        stop_at_terminator(model, run_dir / TOKENIZER, manifest.terminator)
        model.save_pretrained(tmp)  # safetensors
    for item in (run_dir / TOKENIZER).iterdir():
        shutil.copy2(item, tmp / item.name)
    write_json(
        tmp / "tunelab-export.json",
        {
            "run": str(run_dir.resolve()),
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
