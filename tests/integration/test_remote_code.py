"""A model that ships its own modelling code (config.json's auto_map, as InternLM2, older Phi-3 and DeepSeek-V2
snapshots do): nothing of it runs unless model.trust_remote_code says so, and then it plans, trains and exports as
a model Transformers knows does. The code here is a Llama under another model_type, so the built-in model's weights
and counts are its oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import make_plan

pytestmark = pytest.mark.slow

CONFIGURATION = """from pathlib import Path

from transformers import LlamaConfig

Path({marker!r}).write_text("executed")


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


def remote_model(tiny_model_dir: Path, dest: Path, marker: Path) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    (dest / "configuration_tinyremote.py").write_text(CONFIGURATION.format(marker=str(marker)))
    (dest / "modeling_tinyremote.py").write_text(MODELING)
    config = json.loads((dest / "config.json").read_text())
    config |= {
        "model_type": "tinyremote",
        "architectures": ["TinyRemoteForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM",
        },
    }
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def experiment(tmp_path: Path, model: Path, trust: bool, name: str = "exp.yaml") -> Path:
    return write_experiment(
        tmp_path,
        f"name: remote\nmodel: {{id: {model}, trust_remote_code: {str(trust).lower()}}}\n"
        f"data: {{train: {DATA / 'sft_train.jsonl'}, eval: {DATA / 'sft_eval.jsonl'}}}\n"
        f"scope: {{lora: {{r: 4, targets: qv}}}}\ntrain: {{max_steps: 2, batch_size: 2}}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
        name,
    )


def test_a_model_with_its_own_code_runs_none_of_it_unless_trusted_and_then_trains_and_exports(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.export import export_run
    from tunelab.scopes import load_trained

    marker = tmp_path / "executed"
    model = remote_model(tiny_model_dir, tmp_path / "remote", marker)
    refused = run_cli("plan", str(experiment(tmp_path, model, trust=False)))
    assert refused.returncode == 2 and refused.stderr == (
        f"error: {tmp_path / 'exp.yaml'}: model.id: '{model}' needs modelling code of its own (its config.json's "
        "auto_map), which tunelab runs only when told to: read that code, then set model.trust_remote_code: true\n"
    )
    assert not marker.exists()

    trusted = load_experiment(experiment(tmp_path, model, trust=True))
    same_as_llama = load_experiment(experiment(tmp_path, tiny_model_dir, trust=False, name="llama.yaml"))
    counts = make_plan(trusted).scope
    assert marker.exists()
    llama = make_plan(same_as_llama).scope
    assert (counts.trainable_params, counts.total_params) == (llama.trainable_params, llama.total_params)

    done = run_cli("train", str(experiment(tmp_path, model, trust=True)))
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "remote"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["trainable_params"] == llama.trainable_params

    merged = export_run(run, tmp_path / "merged", merge=True)
    assert (merged / "modeling_tinyremote.py").is_file()  # the code travels with the model that needs it
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    plain = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)
    assert type(plain).__name__ == "TinyRemoteForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, load_trained(run)(ids).logits, atol=1e-4, rtol=0)
