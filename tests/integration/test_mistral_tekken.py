"""Mistral's own tokenizer file, tekken.json, as the Mistral-Nemo and Mistral-Small 3.x repositories ship it beside
(or, for newer ones, instead of) tokenizer.json, on a machine where mistral-common is installed (vLLM installs it).

There Transformers reads such a folder with mistral-common's backend, which renders chats in its own code and has no
chat template: tunelab refused the model ("the tokenizer has no chat template") although the folder ships one. The
tekken.json is mistral-common's own copy of Mistral's tekken_240911 (package data of mistral-common 1.13.1), the
tokenizer of the Tekken-era models; the chat template is Mistral-7B-Instruct-v0.3's (tests/fixtures/chat_models).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, DATA, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.plan import make_plan

pytestmark = pytest.mark.slow
TEMPLATE = CONFIGS.parent / "chat_models" / "mistral-7b-instruct-v0.3.jinja"


def tekken_model(dest: Path, with_tokenizer_json: bool) -> Path:
    """A two-layer Mistral with Mistral's tekken.json; with the Transformers tokenizer files beside it (special tokens
    and chat template as the hub's tokenizer_config.json names them) as the hub repositories hold them, or alone."""
    import mistral_common
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=131072, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(dest)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json", dest / "tekken.json")
    if with_tokenizer_json:
        tokenizer = AutoTokenizer.from_pretrained(dest, mistral_format=False)  # converted from tekken.json
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token = "<s>", "</s>", "<unk>"
        tokenizer.chat_template = TEMPLATE.read_text()
        tokenizer.save_pretrained(dest)
    return dest


def experiment(tmp_path: Path, model: Path) -> Path:
    return write_experiment(
        tmp_path,
        f"name: tekken\nmodel: {{id: {model}}}\ndata: {{train: {DATA / 'sft_train.jsonl'}, eval_fraction: 0.1}}\n"
        f"tokenizer: {{fold_system: true}}\nscope: {{lora: {{r: 4, targets: qv}}}}\n"
        f"train: {{max_steps: 2, batch_size: 2}}\noutput: {{dir: {tmp_path / 'runs'}}}\n",
    )


def test_a_mistral_folder_with_tekken_json_trains_on_its_own_template_where_mistral_common_is_installed(
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    model = tekken_model(tmp_path / "mistral", with_tokenizer_json=True)
    assert type(AutoTokenizer.from_pretrained(model)).__name__ == "MistralCommonBackend"  # what Transformers picks

    plan = make_plan(load_experiment(experiment(tmp_path, model)))
    first = "".join(text for text, _ in plan.data.first_example)
    assert first.startswith("<s>[INST]") and "[/INST]" in first  # the shipped template renders the prompt
    supervised = [text for text, loss in plan.data.first_example if loss]
    assert supervised and supervised[-1].endswith("</s>")
    done = run_cli("train", str(experiment(tmp_path, model)))
    assert done.returncode == 0, done.stderr[-2000:]
    saved = tmp_path / "runs" / "tekken" / "tokenizer"
    assert (saved / "chat_template.jinja").read_text() == TEMPLATE.read_text()


def test_a_folder_with_tekken_json_alone_is_read_as_a_tokenizer_and_asked_for_a_template(tmp_path: Path) -> None:
    """Newer Mistral repositories ship tekken.json alone: it converts to a Transformers tokenizer, which has no chat
    template, so plan says to set one; it no longer reported the folder as having no tokenizer at all."""
    model = tekken_model(tmp_path / "mistral", with_tokenizer_json=False)
    done = run_cli("plan", str(experiment(tmp_path, model)))
    assert done.returncode == 2
    assert "tokenizer.chat_template: the tokenizer has no chat template; set one" in done.stderr
    assert "no tokenizer beside the model config" not in done.stdout
