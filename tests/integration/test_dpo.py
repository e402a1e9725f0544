"""DPO on the built-in model: from scratch, on top of SFT, reference strategies, refusals, resume."""

from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, resume_matches_straight
from tunelab.config import load_experiment
from tunelab.errors import TunelabError
from tunelab.runs import read_manifest, read_metrics
from tunelab.train import train

pytestmark = pytest.mark.slow


def experiment(example: str, tmp_path: Path, *overrides: str):
    return load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={tmp_path / 'runs'}", *overrides])


def test_sft_then_dpo_raises_preference_accuracy(tmp_path: Path, tiny_model_dir) -> None:
    sft = train(experiment("quickstart", tmp_path))
    dpo = train(experiment("sft-then-dpo", tmp_path, f"init_from={sft.run_dir}"))
    m = dpo.manifest
    assert m.status == "completed" and m.init_from == str(sft.run_dir)
    # 0.67 -> 1.00 on the shipped base
    assert m.preference_accuracy_after >= m.preference_accuracy_before + 0.2
    assert m.final_eval_loss < m.base_eval_loss
    rows = read_metrics(dpo.run_dir)
    keys = set().union(*rows)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= keys
    # It continued the SFT adapter: its starting point was the SFT model, not the base.
    from safetensors.torch import load_file

    start, end = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (sft.run_dir, dpo.run_dir))
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    assert not (dpo.run_dir / "adapter" / "ref").exists()


def test_lora_dpo_holds_no_second_copy_of_the_base(tmp_path: Path, tiny_model_dir) -> None:
    from tunelab.data import load_splits
    from tunelab.methods.common import Hardware
    from tunelab.methods.dpo import build_trainer
    from tunelab.models import load_model, load_tokenizer
    from tunelab.scopes import apply_scope

    exp = experiment("dpo", tmp_path)
    base = load_model(exp.model, torch.float32, "cpu")
    base_params = sum(p.numel() for p in base.parameters())
    model, resolved = apply_scope(base, exp.scope)
    splits = load_splits(exp.data, "dpo", 0)
    trainer = build_trainer(
        model,
        load_tokenizer(exp.tokenizer, exp.model),
        splits.train.rows[:16],
        None,
        exp.train,
        exp.dpo,
        "adapter",
        Hardware("cpu", torch.float32, False),
        tmp_path / "ck",
        [],
    )
    assert trainer.ref_model is None
    held = sum(p.numel() for p in trainer.model.parameters())
    assert held <= base_params + 2 * resolved.trainable_params  # base once, adapter and its frozen "ref" copy


def test_precomputed_reference_equals_live_reference(tmp_path: Path, tiny_model_dir) -> None:
    common = [
        "scope={partial: {last_blocks: 1, lm_head: true}}",
        "train.max_steps=6",
        "train.logging_steps=1",
        "train.learning_rate=1e-4",
    ]
    live = train(experiment("dpo", tmp_path, *common, "dpo.reference=live", "output.name=live"))
    pre = train(experiment("dpo", tmp_path, *common, "dpo.reference=precomputed", "output.name=pre"))
    assert live.manifest.reference == "copy" and pre.manifest.reference == "precomputed"
    a = [r["loss"] for r in read_metrics(live.run_dir) if "loss" in r]
    b = [r["loss"] for r in read_metrics(pre.run_dir) if "loss" in r]
    assert len(a) == len(b) == 6
    assert abs(a[-1] - b[-1]) < 1e-4
    assert abs(live.manifest.final_eval_loss - pre.manifest.final_eval_loss) < 1e-4


def test_init_from_another_base_is_refused(tmp_path: Path, tiny_model_dir) -> None:
    sft = train(experiment("lora-qv", tmp_path, "train.max_steps=1"))
    manifest = __import__("json").loads((sft.run_dir / "manifest.json").read_text())
    manifest["base_model"]["fingerprint"] = "0123456789abcdef"
    (sft.run_dir / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(TunelabError, match="init_from: run .* was trained on another base model"):
        train(experiment("sft-then-dpo", tmp_path, f"init_from={sft.run_dir}"))
    assert not (tmp_path / "runs" / "sft-then-dpo").exists()


def test_init_from_other_scope_kind_is_refused(tmp_path: Path, tiny_model_dir) -> None:
    sft = train(experiment("partial-last4", tmp_path, "train.max_steps=1"))
    with pytest.raises(TunelabError, match="trained a partial scope but this experiment's scope is lora"):
        train(experiment("sft-then-dpo", tmp_path, f"init_from={sft.run_dir}"))


def test_dpo_resume_after_sigkill(tmp_path: Path, tiny_model_dir) -> None:
    resume_matches_straight("dpo", tmp_path)
    assert read_manifest(tmp_path / "crashed").status == "completed"


def test_precomputed_reference_is_reused_by_a_second_run(tmp_path: Path, tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))  # a cache of this test's own
    common = ["scope={partial: {last_blocks: 1}}", "train.max_steps=3", "train.logging_steps=1"]
    first = train(experiment("dpo", tmp_path, *common, "output.name=a"))
    cache = Path(first.manifest.ref_logps_cache)
    files = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in cache.iterdir()}
    assert set(files) == {"train.safetensors", "eval.safetensors"} and first.manifest.ref_logps_reused is False
    second = train(experiment("dpo", tmp_path, *common, "output.name=b", "train.learning_rate=5e-4"))
    assert second.manifest.ref_logps_reused is True and Path(second.manifest.ref_logps_cache) == cache
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in cache.iterdir()} == files  # nothing rewritten
    # Another max_length gives other log-probs: another cache entry, computed afresh.
    shorter = train(experiment("dpo", tmp_path, *common, "output.name=d", "train.max_length=64"))
    assert shorter.manifest.ref_logps_reused is False and Path(shorter.manifest.ref_logps_cache) != cache
    again = train(experiment("dpo", tmp_path, *common, "output.name=c"))
    a = [r["loss"] for r in read_metrics(first.run_dir) if "loss" in r]
    c = [r["loss"] for r in read_metrics(again.run_dir) if "loss" in r]
    assert a == c  # cached log-probs give the same losses as computed ones


def test_live_reference_after_partial_sft_is_the_sft_model(tmp_path: Path, tiny_model_dir) -> None:
    """A live (copied) reference must be the starting model, as the precomputed one is, not the reloaded base."""
    sft = train(experiment("partial-last4", tmp_path, "train.max_steps=5", "train.learning_rate=1e-3"))
    common = [
        "scope={partial: {last_blocks: 4, norm: true, lm_head: true}}",
        f"init_from={sft.run_dir}",
        "train.max_steps=3",
        "train.logging_steps=1",
        "train.learning_rate=1e-4",
    ]
    live = train(experiment("dpo", tmp_path, *common, "dpo.reference=live", "output.name=live"))
    pre = train(experiment("dpo", tmp_path, *common, "dpo.reference=precomputed", "output.name=pre"))
    a = [r["loss"] for r in read_metrics(live.run_dir) if "loss" in r]
    b = [r["loss"] for r in read_metrics(pre.run_dir) if "loss" in r]
    assert abs(a[0] - 0.6931) < 1e-3  # policy == reference at the start: loss ln 2
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_compare_ranks_the_same_pairs_with_every_variant(tmp_path: Path, tiny_model_dir) -> None:
    """pref acc in compare: the base and every run rank the first preference run's held-out pairs (or --pairs), so an
    SFT run has one too; the DPO run's equals what its manifest measured after training, the base's before."""
    from tests.conftest import DATA
    from tunelab.compare import compare

    sft = train(experiment("quickstart", tmp_path, "train.max_steps=2")).run_dir
    dpo = train(experiment("dpo", tmp_path, "train.max_steps=8"))
    ours = compare([sft, dpo.run_dir], asked=["What is the capital of Molo?"], max_new_tokens=4)
    ranked = {v.name: v.numbers["preference_accuracy"] for v in ours.variants}
    assert ranked["dpo"] == dpo.manifest.preference_accuracy_after
    assert ranked["base"] == dpo.manifest.preference_accuracy_before
    assert ranked["quickstart"] is not None
    pairs = sum(1 for line in (DATA / "pref_eval.jsonl").read_text().splitlines() if line.strip())
    assert ours.settings["preference_pairs"] == pairs
    alone = compare([sft], asked=["Hi"], max_new_tokens=2, pairs_file=DATA / "pref_eval.jsonl")
    assert {v.name: v.numbers["preference_accuracy"] for v in alone.variants} == {
        "base": ranked["base"],
        "quickstart": ranked["quickstart"],
    }
