"""The built-in base ships with tunelab: the same weights on every machine, with the tokenizer and config that
`python -m tunelab.builtin` writes from the tiny world."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.builtin import materialise, tiny_chat_tokenizer
from tunelab.errors import ConfigError

SHIPPED = materialise("tiny-chat")
CONVERSATION_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def without_writer(path: Path) -> dict:
    """A config file's settings, without the version of Transformers that wrote it."""
    settings = json.loads(path.read_text())
    assert settings.pop("transformers_version").startswith("5.")
    return settings


def corpus_loss(folder: Path, fresh: bool = False) -> float:
    """The model's loss on the first 512 tokens of its pre-training prose (a random init of its config if fresh)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import tinyworld

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if fresh:
        torch.manual_seed(0)
        model = type(model)(model.config)
    ids = tokenizer(" ".join(tinyworld.pretrain_corpus()[:40]), return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_the_shipped_tokenizer_is_the_one_the_tiny_world_trains(tmp_path: Path) -> None:
    """Regenerating the bundled data (tinyworld) without rebuilding the base would leave a tokenizer trained on other
    words beside the data: the files must be byte for byte what the build writes now."""
    tiny_chat_tokenizer().save_pretrained(tmp_path)
    for name in CONVERSATION_FILES:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_the_shipped_weights_are_pre_trained_and_say_how() -> None:
    assert corpus_loss(SHIPPED) < 2.0 < 5.0 < corpus_loss(SHIPPED, fresh=True)  # about 1.25 against 6.5
    record = json.loads((SHIPPED / "tunelab-builtin.json").read_text())
    assert record["name"] == "tiny-chat" and record["seed"] == 0
    assert {"machine", "cpu", "torch", "torch_cpu_capability"} <= record["built_on"].keys()


def test_the_shipped_weights_are_shards_small_enough_for_git() -> None:
    """Sharded as hub checkpoints are, each file under 2 MB: the repository holds them without Git LFS."""
    index = json.loads((SHIPPED / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in SHIPPED.glob("*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values())) and len(shards) > 1
    assert max((SHIPPED / shard).stat().st_size for shard in shards) < 2 * 2**20


def test_an_unknown_builtin_is_refused_with_the_ones_there_are() -> None:
    with pytest.raises(ConfigError, match=r"unknown built-in model 'builtin:huge'; available: builtin:tiny-chat"):
        materialise("huge")


@pytest.mark.slow
def test_the_base_rebuilds_from_the_seed(tmp_path: Path) -> None:
    """`python -m tunelab.builtin FOLDER` pre-trains a base as the shipped one was: the same tokenizer and config byte
    for byte, and weights as pre-trained (this machine's arithmetic rounds them its own way)."""
    folder = tmp_path / "tiny-chat"
    done = subprocess.run([sys.executable, "-m", "tunelab.builtin", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())  # sharded alike
    for name in (*CONVERSATION_FILES, "model.safetensors.index.json"):
        assert (folder / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    for name in ("config.json", "generation_config.json"):  # the same settings, written by whichever Transformers
        assert without_writer(folder / name) == without_writer(SHIPPED / name), name
    assert corpus_loss(folder) < 2.0
    record = json.loads((folder / "tunelab-builtin.json").read_text())
    assert record["pretrain_steps"] == 300 and record["built_on"]["torch"].startswith("2.")
