"""Float32 master weights on a bfloat16 base: train_partial_ft.py's learning rate (5e-6) moves every opened weight,
where updating the bfloat16 weights themselves loses most updates; the result is saved in the model's dtype, and a
resumed run continues the float32 copies exactly."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLES, resume_matches_straight
from tunelab.config import load_experiment
from tunelab.plan import make_plan
from tunelab.scopes import BaseLoader
from tunelab.train import train

pytestmark = pytest.mark.slow


def changed_share(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """The share of elements that differ from the base's (compared in float32, which holds every bfloat16)."""
    changed = sum(int((t.float() != base[n].float()).sum()) for n, t in tensors.items())
    return changed / sum(t.numel() for t in tensors.values())


def test_float32_master_weights_keep_the_updates_bfloat16_loses(tmp_path: Path, tiny_model_dir) -> None:
    overrides = [f"output.dir={tmp_path}", "model.dtype=bfloat16", "train.max_steps=3", "train.save_steps=3"]
    master = load_experiment(EXAMPLES / "partial-last4.yaml", overrides)
    assert master.train.learning_rate == 5e-6
    plan = make_plan(master)
    assert plan.memory.master == "params"
    assert plan.memory.gradients_bytes == plan.scope.trainable_params * 4  # float32 weights, float32 gradients
    run = train(master)
    assert run.manifest.change_check.ok
    base = {n: p.detach() for n, p in BaseLoader.pick(master.model).load().named_parameters()}
    # The checkpoint holds the float32 copies: every opened weight moved.
    checkpoint = load_file(str(run.run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors"))
    opened = {n: checkpoint[n] for n in plan.scope.trainable_names}
    assert {t.dtype for t in opened.values()} == {torch.float32}
    assert changed_share(opened, base) > 0.99
    assert sorted(checkpoint) == sorted(plan.scope.trainable_names)  # the frozen embeddings stay with the base
    # The result is in the model's dtype, as the base is.
    result = load_file(str(run.run_dir / "trained.safetensors"))
    assert {t.dtype for t in result.values()} == {torch.bfloat16}
    # plan's disk estimate counts both dtypes: float32 copies in checkpoints, bfloat16 in the result.
    saved = (run.run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors").stat().st_size
    assert 0 <= saved - plan.disk.checkpoint_weights_bytes < 16 * 1024  # the safetensors header
    assert 0 <= (run.run_dir / "trained.safetensors").stat().st_size - plan.scope.trainable_params * 2 < 16 * 1024

    half = load_experiment(EXAMPLES / "partial-last4.yaml", [*overrides, "train.master_weights=model", "output.name=h"])
    half_plan = make_plan(half)
    assert half_plan.memory.master == "none"
    assert any("update in bfloat16 itself" in w for w in half_plan.warnings)
    lossy = load_file(str(train(half).run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors"))
    assert changed_share({n: lossy[n] for n in plan.scope.trainable_names}, base) < 0.2


def test_a_resumed_run_continues_its_float32_master_weights_exactly(tmp_path: Path, tiny_model_dir) -> None:
    resume_matches_straight("partial-last4", tmp_path, "--set", "model.dtype=bfloat16")
