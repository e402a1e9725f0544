"""Paths the README documents that no other test walks: full fine-tuning end to end, gradient checkpointing,
partial blocks and embeddings, compare without the base."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, run_cli, trained_tensors
from tunelab.config import load_experiment
from tunelab.plan import make_plan
from tunelab.scopes import load_trained
from tunelab.train import train

pytestmark = pytest.mark.slow


def experiment(example: str, tmp_path: Path, *overrides: str):
    return load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={tmp_path}", *overrides])


def test_full_fine_tuning_trains_every_tensor_and_its_model_folder_is_compared_and_exported(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in base.named_parameters()]
    exp = experiment("quickstart", tmp_path, "scope=full", "train.max_steps=3", "train.learning_rate=1e-4")
    m = train(exp).manifest
    assert m.status == "completed" and m.result == "model" and m.scope == "full"
    assert m.trainable_params == m.total_params == sum(p.numel() for p in base.parameters())
    assert m.change_check.ok and m.change_check.trainable_changed == len(names)

    run = tmp_path / "quickstart"
    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    loaded = load_trained(run)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, loaded(ids).logits)
        assert not torch.equal(base(ids).logits, loaded(ids).logits)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What do people in Beldu like to eat?"}\n')
    report = tmp_path / "report"
    out = run_cli("compare", str(run), "--no-base", "--prompts", str(prompts), "--out", str(report))
    assert out.returncode == 0, out.stderr[-2000:]
    variants = [v["name"] for v in json.loads((report / "report.json").read_text())["variants"]]
    assert variants == ["quickstart"]  # --no-base: the run alone

    exported = run_cli("export", str(run), "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, saved(ids).logits)


def test_gradient_checkpointing_changes_the_memory_not_the_math(tmp_path: Path, tiny_model_dir) -> None:
    results = {
        setting: train(
            experiment(
                "lora-qv",
                tmp_path,
                "train.max_steps=3",
                f"train.gradient_checkpointing={setting}",
                f"output.name={setting}",
            )
        )
        for setting in ("on", "off")
    }
    assert results["on"].manifest.gradient_checkpointing is True
    assert results["off"].manifest.gradient_checkpointing is False
    on, off = (trained_tensors(results[s].run_dir) for s in ("on", "off"))
    assert on.keys() == off.keys()
    for name in on:
        torch.testing.assert_close(on[name], off[name], atol=1e-6, rtol=1e-5)
    # auto: on only when the plan's static memory and activations would not fit this machine's memory.
    auto = make_plan(experiment("lora-qv", tmp_path, "train.gradient_checkpointing=auto")).memory
    assert auto.gradient_checkpointing is False and auto.total_bytes < 0.9 * auto.device_bytes


def test_partial_blocks_and_embeddings_open_exactly_those_tensors(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    exp = load_experiment(
        EXAMPLES / "partial-last4.yaml",
        [f"output.dir={tmp_path}", "scope={partial: {blocks: [0, '2-3'], embeddings: true}}"],
    )
    plan = make_plan(exp)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prefixes = ("model.layers.0.", "model.layers.2.", "model.layers.3.", "model.embed_tokens.")
    expected = sorted(n for n, _ in base.named_parameters() if n.startswith(prefixes))
    assert sorted(plan.scope.trainable_names) == expected
    assert plan.scope.trainable_params == sum(p.numel() for n, p in base.named_parameters() if n in expected)
    assert plan.scope.layers == [0, 2, 3]
    # Open embeddings need the activations of every layer for backward.
    assert plan.memory.activation_layers == base.config.num_hidden_layers
