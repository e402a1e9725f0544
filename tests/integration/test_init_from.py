"""init_from: what a run continues, as plan shows it and training loads it; an adapter made by a plain PEFT script
(the user's own train_lora.py output) is a starting point like a tunelab run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import EXAMPLES
from tunelab.config import load_experiment
from tunelab.errors import ConfigError
from tunelab.plan import make_plan
from tunelab.train import train

pytestmark = pytest.mark.slow


def experiment(example: str, tmp_path: Path, *overrides: str):
    return load_experiment(EXAMPLES / f"{example}.yaml", [f"output.dir={tmp_path / 'runs'}", *overrides])


def test_plan_counts_the_adapter_a_run_continues_not_the_files_own_lora_settings(tmp_path: Path) -> None:
    """The continued adapter keeps its own settings (PeftModel.from_pretrained): plan showed scope.lora's instead."""
    sft = train(experiment("quickstart", tmp_path, "scope.lora.targets=qv", "scope.lora.r=8", "train.max_steps=2"))
    fresh = make_plan(experiment("sft-then-dpo", tmp_path))
    plan = make_plan(experiment("sft-then-dpo", tmp_path, f"init_from={sft.run_dir}"))
    assert plan.scope.trainable_params == sft.manifest.trainable_params != fresh.scope.trainable_params
    assert plan.scope.target_modules == ["q_proj", "v_proj"]
    assert any(
        w.startswith(f"init_from: the adapter of {sft.run_dir} keeps training with its own settings")
        and "r 8 (scope.lora: 16)" in w
        for w in plan.scope.warnings
    )
    dpo = train(experiment("sft-then-dpo", tmp_path, f"init_from={sft.run_dir}", "train.max_steps=2")).manifest
    assert dpo.trainable_params == plan.scope.trainable_params


def test_an_adapter_made_by_a_plain_peft_script_is_continued(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    settings = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path / "train_lora_output"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), settings).save_pretrained(folder)
    start = load_file(folder / "adapter_model.safetensors")

    plan = make_plan(experiment("quickstart", tmp_path, f"init_from={folder}"))
    assert plan.scope.trainable_params == sum(t.numel() for t in start.values())
    assert plan.scope.adapter.startswith("r 4, alpha 8")

    # One step at a tiny learning rate: the result is the script's adapter, moved a little (a fresh one has B = 0).
    m = train(
        experiment("quickstart", tmp_path, f"init_from={folder}", "train.max_steps=1", "train.learning_rate=1e-6")
    )
    assert m.manifest.status == "completed" and m.manifest.init_from == str(folder)
    after = load_file(m.run_dir / "adapter" / "adapter_model.safetensors")
    assert after.keys() == start.keys()
    for key, tensor in start.items():
        torch.testing.assert_close(after[key], tensor, atol=1e-4, rtol=0)
    assert all(t.abs().max() > 1e-2 for k, t in start.items() if "lora_B" in k)

    # Given as the model, it says what to write instead.
    with pytest.raises(
        ConfigError,
        match=rf"holds a trained result \(lora r4 q_proj,v_proj\), not a model; set model.id to its base \({tiny_model_dir}\) and init_from: {folder}",
    ):
        make_plan(experiment("quickstart", tmp_path, f"model.id={folder}"))
    # An adapter of another base, or of another kind, is refused in one line.
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/other"}))
    with pytest.raises(ConfigError, match=r"was trained on 'org/other' \(as its files say\), not on model.id"):
        make_plan(experiment("quickstart", tmp_path, f"init_from={folder}"))
    (folder / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ConfigError, match=r"holds a IA3 adapter; tunelab uses LoRA adapters"):
        make_plan(experiment("quickstart", tmp_path, f"init_from={folder}"))
    with pytest.raises(ConfigError, match=r"is not a tunelab run nor a PEFT adapter folder \(adapter_config.json\)"):
        make_plan(experiment("quickstart", tmp_path, f"init_from={tmp_path}"))


def test_an_adapter_of_another_model_is_refused_in_one_line_by_plan_and_compare(tmp_path: Path, tiny_model_dir) -> None:
    """Its config names this base, but its tensors were trained on a narrower model: plan reads the shapes from the
    file's header, compare from PEFT's load, each as one line instead of PEFT's list of every mismatch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.compare import compare

    narrow = AutoConfig.from_pretrained(tiny_model_dir)
    narrow.hidden_size, narrow.intermediate_size = 64, 128
    folder = tmp_path / "elsewhere"
    settings = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_config(narrow), settings).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tiny_model_dir)}))
    with pytest.raises(
        ConfigError,
        match=r"its tensors do not fit this base model, so it was trained on another \(.*lora_A.weight: \[4, 64\] saved, \[4, 128\] here\)",
    ):
        make_plan(experiment("quickstart", tmp_path, f"init_from={folder}"))
    sft = train(experiment("quickstart", tmp_path, "train.max_steps=1")).run_dir
    with pytest.raises(
        ConfigError, match=r"its tensors do not fit this base model, so it was trained on another \(size mismatch"
    ):
        compare([sft, folder], asked=["Hi"], max_new_tokens=2)
