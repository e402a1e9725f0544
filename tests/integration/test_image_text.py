"""Image-text checkpoints trained on text: Gemma 3 (Transformers builds it through AutoModelForCausalLM) and
Mistral Small 3.x (through AutoModelForImageTextToText), tiny models of their real classes. The language model
trains, the vision encoder stays byte-identical, and the result loads and answers like any causal LM's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.chat_fixtures import build
from tests.conftest import CONFIGS, run_cli, write_experiment
from tunelab.config import load_experiment
from tunelab.runs import read_manifest
from tunelab.scopes import load_trained
from tunelab.train import train

pytestmark = pytest.mark.slow

REPLY = "Beldu people eat apples."
CONVERSATION = [
    {"role": "user", "content": "What do people in Beldu eat?"},
    {"role": "assistant", "content": REPLY},
]


def vision_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".vision_tower." in n}


def one_reply_data(folder: Path) -> Path:
    data = folder / "brief.jsonl"
    data.write_text((json.dumps({"messages": CONVERSATION}) + "\n") * 32)
    return data


def test_gemma3_lora_trains_the_language_model_and_the_merged_export_answers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build("gemma-3-it", tmp_path / "gemma-3-it")
    exp = write_experiment(
        tmp_path,
        f"name: brief\nmodel: {{id: {base}}}\ndata: {{train: {one_reply_data(tmp_path)}}}\n"
        "scope: {lora: {r: 32, alpha: 64, dropout: 0.0, targets: all-linear}}\n"
        "train: {learning_rate: 3.0e-3, max_steps: 60, batch_size: 8, logging_steps: 20}\n"
        f"output: {{dir: {tmp_path / 'runs'}}}\n",
    )
    assert run_cli("train", str(exp)).returncode == 0
    run = tmp_path / "runs" / "brief"
    (note,) = read_manifest(run).scope_notes  # the run says, as plan did, what stayed frozen
    assert note.startswith("Gemma3ForConditionalGeneration is an image-text model") and "model.vision_tower" in note
    targets = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 2 * 7  # two decoder layers, seven projections each; none of SigLIP's
    assert all(t.startswith("model.language_model.layers.") for t in targets)

    out = tmp_path / "export"
    r = run_cli("export", str(run), "--out", str(out), "--merge")
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert type(merged).__name__ == "Gemma3ForConditionalGeneration"
    before, after = vision_tensors(original), vision_tensors(merged)
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = merged.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert generated[-1].item() == tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.decode(generated[:-1]).strip() == REPLY

    # compare attaches the adapter to the loaded image-text base and generates the same answer
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": CONVERSATION[:1], "contains": ["apples"]}) + "\n")
    r = run_cli("compare", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr[-2000:]
    outputs = json.loads((tmp_path / "report" / "report.json").read_text())["outputs"]
    assert [o.strip() for o in outputs["brief"]] == [REPLY]


def tiny_mistral_small(tmp_path: Path) -> Path:
    """Mistral Small 3.2's published config.json shrunk (same classes: Mistral3, a Mistral text model, a Pixtral
    vision tower; lm_head its own tensor), with the Mistral v0.3 template and tokenizer layout."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = build("mistral-7b-instruct-v0.3", tmp_path / "tokenizer-source")
    config = json.loads((CONFIGS / "mistral-small-3.2-24b-instruct" / "config.json").read_text())
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    config["text_config"] |= dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=vocab, max_position_embeddings=512,
    )  # fmt: skip
    config["vision_config"] |= dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16, image_size=28
    )
    config["image_token_index"] = vocab - 1
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config, tie_word_embeddings=False))
    dest = tmp_path / "mistral-small"
    model.save_pretrained(dest)
    # As published: the wrapper does not say whether lm_head is tied (Transformers 5 would default it to tied).
    saved = json.loads((dest / "config.json").read_text())
    del saved["tie_word_embeddings"]
    (dest / "config.json").write_text(json.dumps(saved))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (folder / name).is_file():
            (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def test_mistral_small_full_fine_tuning_loads_through_image_text_to_text(tmp_path: Path) -> None:
    base = tiny_mistral_small(tmp_path)
    exp = load_experiment(
        write_experiment(
            tmp_path,
            f"name: full\nmodel: {{id: {base}}}\ndata: {{train: {one_reply_data(tmp_path)}}}\n"
            "tokenizer: {fold_system: true}\nscope: full\n"
            "train: {learning_rate: 1.0e-3, max_steps: 2, batch_size: 4}\n"
            f"output: {{dir: {tmp_path / 'runs'}}}\n",
        )
    )
    result = train(exp)
    m = result.manifest
    assert m.status == "completed" and m.change_check.ok
    original = load_trained_base(base)
    text = sum(p.numel() for n, p in original.named_parameters() if n.startswith(("model.language_model.", "lm_head.")))
    assert m.trainable_params == text < m.total_params
    trained = load_trained(result.run_dir)
    assert type(trained).__name__ == "Mistral3ForConditionalGeneration"
    assert trained.lm_head.weight.data_ptr() != trained.get_input_embeddings().weight.data_ptr()
    before, after = vision_tensors(original), vision_tensors(trained)
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    changed = [
        n
        for n, p in trained.named_parameters()
        if n.startswith("model.language_model.layers.") and not torch.equal(p, original.get_parameter(n))
    ]
    assert changed


def load_trained_base(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder)


def test_a_checkpoint_missing_weights_its_config_asks_for_is_refused(tmp_path: Path) -> None:
    """Said to have its own lm_head but saved without one: Transformers would start lm_head random and train on."""
    from tunelab.config import ModelSettings
    from tunelab.errors import ConfigError
    from tunelab.models import load_model

    base = tiny_mistral_small(tmp_path)
    safetensors = base / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(safetensors))
    del tensors[next(k for k in tensors if k.endswith("lm_head.weight"))]  # saved under Transformers 4's names
    save_file(tensors, str(safetensors), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"lack 1 tensor\(s\) its config.json asks for \(lm_head.weight\)"):
        load_model(ModelSettings(id=str(base)), torch.float32, "cpu")


def tiny_qwen2_5_vl(tmp_path: Path) -> Path:
    """A Qwen2.5-VL of two layers (head_dim 128, as its multimodal rope sections need) with Qwen2.5's template
    and tokenizer layout."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    folder = build("qwen2.5-instruct", tmp_path / "tokenizer-source")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    unused = tokenizer.convert_tokens_to_ids(["<|object_ref_start|>", "<|object_ref_end|>", "<|endoftext|>"])
    text = dict(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
    )  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=256)
    config = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=text,
        vision_config=vision,
        image_token_id=unused[0],
        video_token_id=unused[1],
        vision_start_token_id=unused[2],
    )
    torch.manual_seed(0)
    dest = tmp_path / "qwen2.5-vl"
    AutoModelForImageTextToText.from_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def test_a_model_that_lets_packed_examples_attend_to_each_other_trains_on_padded_batches(tmp_path: Path) -> None:
    """Qwen2.5-VL's multimodal rope hides the restarts of position_ids from Transformers' masks: concatenated
    examples would see each other. The check before training finds it and pads instead (or refuses an explicit
    padding_free: on); a Llama keeps them apart and stays padding-free."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from tunelab.errors import ConfigError
    from tunelab.methods.common import packed_rows_refusal

    base = tiny_qwen2_5_vl(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert packed_rows_refusal(AutoModelForImageTextToText.from_pretrained(base), tokenizer) == (
        "lets examples concatenated in one row attend to each other (checked on two sentences)"
    )
    llama = build("llama-3.2-instruct", tmp_path / "llama")
    assert (
        packed_rows_refusal(AutoModelForCausalLM.from_pretrained(llama), AutoTokenizer.from_pretrained(llama)) is None
    )

    text = (
        f"name: vl\nmodel: {{id: {base}}}\ndata: {{train: {one_reply_data(tmp_path)}}}\n"
        f"train: {{max_steps: 2, batch_size: 4}}\noutput: {{dir: {tmp_path / 'runs'}}}\n"
    )
    result = train(load_experiment(write_experiment(tmp_path, text)))
    assert result.manifest.status == "completed" and result.manifest.batching["padding_free"] is False
    on = text.replace("name: vl", "name: vl-on").replace("batch_size: 4}", "batch_size: 4, padding_free: on}")
    with pytest.raises(ConfigError, match=r"^train.padding_free: on, but Qwen2_5_VLForConditionalGeneration lets"):
        train(load_experiment(write_experiment(tmp_path, on)))


def test_a_partial_qwen2_5_vl_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """Qwen2.5-VL's hub layout names the language model's weights otherwise (model.layers.* for the model's
    model.language_model.layers.*): a checkpoint in that layout, reloaded by the Trainer's plain load_state_dict,
    would resume the opened blocks from the base (huggingface/transformers#43701)."""
    from tests.conftest import resume_matches_straight

    base = tiny_qwen2_5_vl(tmp_path)
    data = one_reply_data(tmp_path)
    settings = [f"model.id={base}", f"data.train={data}", "data.eval=null", "train.batch_size=4"]
    settings += ["scope={partial: {last_blocks: 1, norm: true}}"]
    resume_matches_straight("quickstart", tmp_path / "runs", *(x for s in settings for x in ("--set", s)))
