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


def verify_adapter(folder: Path) -> None:
    """Check an adapter folder before shipping it: its weights file reads whole, and every LoRA pair is there
    with the rank its config gives."""
    import json

    from safetensors import SafetensorError, safe_open

    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not (weights.is_file() and config.is_file()):
        raise TunelabError(f"{folder}: the adapter is incomplete (no adapter_model.safetensors or adapter_config.json)")
    r = json.loads(config.read_text()).get("r")
    try:
        with safe_open(str(weights), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as e:
        raise TunelabError(f"{weights}: unreadable ({e}); the adapter is damaged, retrain or restore it") from e
    a_names = [n for n in tensors if ".lora_A." in n]
    if not a_names:
        raise TunelabError(f"{weights}: holds no LoRA weights; the adapter is damaged")
    for a in a_names:
        b = a.replace(".lora_A.", ".lora_B.")
        if b not in tensors:
            raise TunelabError(f"{weights}: {a} has no {b}; the adapter is damaged")
        rank = tensors[a].shape[0]
        if r and rank % r and r % rank:  # fused experts may carry a multiple of r (PEFT's rank_pattern)
            raise TunelabError(f"{weights}: {a} has rank {rank}, the config says {r}; the adapter is damaged")


def save_model(model, run_dir: Path, out: Path) -> None:
    """A trained model as a Transformers folder (safetensors) that stops at the run's turn terminator."""
    stop_at_terminator(model, run_dir / TOKENIZER, read_manifest(run_dir).terminator)
    model.save_pretrained(out)


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
    kind, base = run_scope(run_dir, device="cpu")
    written = kind.export(run_dir, tmp, merge, base)
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
