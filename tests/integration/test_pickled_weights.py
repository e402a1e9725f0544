"""Weights saved as PyTorch pickles alone (pytorch_model.bin, as older checkpoints and some fine-tunes hold them):
tunelab loads safetensors only, since unpickling can run code. A local folder is refused by plan, before anything
loads, and a hub repository before its files download, each in one line that says how to convert them; nothing of
the pickle is read."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from tests.conftest import DATA, run_cli, write_experiment
from tests.fake_hub import fake_hub, online_env

pytestmark = pytest.mark.slow
REPO_ID = "org/pickled"
FIX = (
    "; tunelab loads safetensors only (unpickling can run code): convert them once, from a copy you trust, with "
    "AutoModelForCausalLM.from_pretrained(it).save_pretrained(new_folder), and set model.id to the new folder\n"
)


def pickled_model(tiny_model_dir: Path, dest: Path) -> Path:
    """The built-in model's folder with its weights as a pickle that would leave a mark if it were ever unpickled."""
    shutil.copytree(tiny_model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    (dest / "pytorch_model.bin").write_bytes(pickle.dumps(Touch(dest.parent / "unpickled"), protocol=4))
    return dest


class Touch:
    """Pickled, a call of Path(marker).touch() when unpickled: loading the weights at all would leave the mark."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def experiment(tmp_path: Path, model: str) -> Path:
    return write_experiment(
        tmp_path,
        f"name: pickled\nmodel: {{id: {model}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}}}\n"
        f"train: {{max_steps: 1}}\noutput: {{dir: {tmp_path / 'runs'}}}\n",
    )


def test_a_folder_of_pickled_weights_is_refused_by_plan(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = pickled_model(tiny_model_dir, tmp_path / "model")
    exp = experiment(tmp_path, str(model))
    done = run_cli("plan", str(exp))
    assert done.returncode == 2 and done.stderr == (
        f"error: {exp}: model.id: '{model}' holds its weights only as PyTorch pickles (pytorch_model.bin){FIX}"
    )
    assert not (tmp_path / "unpickled").exists()


def test_a_hub_repository_of_pickled_weights_is_refused_in_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = pickled_model(tiny_model_dir, tmp_path / "model")
    exp = experiment(tmp_path, REPO_ID)
    with fake_hub(REPO_ID, model) as hub:
        done = run_cli("train", str(exp), env=online_env(hub, tmp_path / "hf"))
        fetched = hub.fetched()
    assert done.returncode == 2
    assert done.stderr == f"error: {exp}: model.id: '{REPO_ID}' holds its weights in no safetensors file{FIX}"
    assert "pytorch_model.bin" not in fetched and "generation_config.json" not in fetched  # refused before it downloads
    assert not (tmp_path / "unpickled").exists()
