"""Tiny model folders of real chat-model families, laid out as a user's download is.

Each folder holds the family's real chat template and special-token layout (tests/fixtures/chat_models/,
sources in SOURCES.md), a small BPE tokenizer of the family's kind (byte-level like Llama-3/Qwen, or
metaspace like the SentencePiece families) trained on the bundled data, and a randomly initialised model
of the family's Transformers class. Deterministic; built once per test session.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "chat_models"
FAMILIES: dict[str, dict] = json.loads((FIXTURES / "families.json").read_text())
DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


# A SigLIP vision tower small enough to build in a second (28x28 images, 4 patches), for image-text families.
IMAGE_TOWER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
)


def _corpus() -> list[str]:
    texts = []
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "pref_train.jsonl"):
        for line in (DATA / name).read_text().splitlines():
            texts.append(line)
    return texts + ["You are a helpful assistant. Hello! How are you today? I am fine, thank you."] * 5


def tokenizer(spec: dict, template: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = spec["special"]
    if spec["pieces"] == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: spaces become "▁" and belong to the following word
        tok = Tokenizer(models.BPE(unk_token=spec["unk"], fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = sorted(
            set("".join(_corpus())) | set(string.ascii_letters + string.digits + string.punctuation) | {"▁", "\n"}
        )
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    named = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    extra = [t for t in special if t not in named.values()]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{f"{k}_token": v for k, v in named.items()},
        additional_special_tokens=extra,
        add_bos_token=spec["add_bos"],
    )
    wrapped.chat_template = template
    return wrapped


def _config(spec: dict, tokenizer, positions: int = 512):
    from transformers import AutoConfig

    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(spec["generation_eos"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec["architecture"] in ("gemma2", "gemma3"):
        sizes |= dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    if spec["architecture"] == "gemma3":  # an image-text checkpoint: the language model's sizes are its text_config
        ids = tokenizer.convert_tokens_to_ids
        return AutoConfig.for_model(
            "gemma3",
            text_config=sizes,
            vision_config=IMAGE_TOWER,
            mm_tokens_per_image=4,
            image_token_index=ids("<image_soft_token>"),
            boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"),
            **{k: sizes[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
    return AutoConfig.for_model(spec["architecture"], **sizes)


def build(family: str, dest: Path, positions: int = 512) -> Path:
    """Write the family's tiny model folder to dest (once); returns dest. `positions`: its max_position_embeddings
    (a prompt that describes tools takes about 700 tokens of the small tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (dest / "config.json").is_file():
        return dest
    spec = FAMILIES[family]
    tok = tokenizer(spec, (FIXTURES / f"{family}.jinja").read_text())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(spec, tok, positions))
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(spec["generation_eos"])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    model.save_pretrained(dest)
    return dest


def trl_tokenizer(name: str, extra: tuple[str, ...] = ()):
    """A small byte-level tokenizer whose special tokens are the markers TRL's template `name` prints, and
    `extra`."""
    import re

    from tunelab.templates import trl_templates

    template = (trl_templates() / f"{name}.jinja").read_text()
    # <|im_end|>, DeepSeek's <｜Assistant｜>, Gemma 4's <|turn> and <turn|>, <think>, Gemma's <end_of_turn>, </s>
    found = re.findall(
        r"<\|[^|<>\s]{1,40}\|>|<｜[^｜]{1,40}｜>|<\|[a-z_]{1,40}>|<[a-z_]{1,40}\|>|</?think>|<(?:start|end)_of_turn>|</s>",
        template,
    )
    markers = sorted(set(found))
    spec = dict(
        pieces="byte-level",
        special=["<bos>", "<eos>", *markers, *extra],
        bos="<bos>",
        eos="<eos>",
        pad=None,
        unk=None,
        add_bos=False,
    )
    return tokenizer(spec, template)


def masked_runs(ids: list[int], mask: list) -> list[list[int]]:
    """The runs of consecutive ids whose mask entry is true: one per supervised span."""
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


def supervised_replies(tok, row: dict) -> list[str]:
    """What carries loss in a row, decoded span by span."""
    from tunelab.templates import tokenize_example

    t = tokenize_example(tok, row)
    return [tok.decode(r) for r in masked_runs(t.input_ids, t.loss_mask)]


# The hub's tokenizer_config.json and generation_config.json of meta-llama/Llama-3.1-8B-Instruct (the mission's model).
LLAMA31_TOKENIZER_CONFIG = dict(
    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072, clean_up_tokenization_spaces=True
)
LLAMA31_GENERATION = dict(
    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], do_sample=True, temperature=0.6, top_p=0.9
)


def meta_llama3_reference():
    """Meta's own Llama 3 tokenizer, from Meta's `llama-models` package on PyPI: `tokenizer.model` is the file every
    Llama 3.x checkpoint ships as original/tokenizer.model, and its tiktoken encoder is how Meta tokenizes."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def meta_llama3_tokenizer(template: str):
    """Meta's Llama 3 tokenizer as the hub's tokenizer.json has it: its tiktoken ranks converted to a fast tokenizer
    the way Transformers converts them, Meta's 256 special tokens, and a BOS added in front of plain text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    reference = meta_llama3_reference()
    special = sorted(reference.special_tokens, key=reference.special_tokens.get)
    from llama_models.llama3 import tokenizer as meta

    ranks = Path(meta.__file__).parent / "tokenizer.model"
    tok = TikTokenConverter(vocab_file=str(ranks), extra_special_tokens=special).converted()
    bos = LLAMA31_TOKENIZER_CONFIG["bos_token"]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, reference.bos_id)]
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **LLAMA31_TOKENIZER_CONFIG)
    wrapped.chat_template = template
    return wrapped


def build_meta_llama31(dest: Path) -> Path:
    """A folder laid out as a download of meta-llama/Llama-3.1-8B-Instruct: Meta's tokenizer with the model's own
    template, the published config.json shrunk to two narrow layers (the vocabulary, rope scaling and stop tokens
    kept), the published generation_config.json, random weights. Written once; returns dest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if (dest / "config.json").is_file():
        return dest
    tok = meta_llama3_tokenizer((FIXTURES / "llama-3.1-instruct.jinja").read_text())
    published = json.loads((FIXTURES.parent / "configs" / "llama-3.1-8b-instruct" / "config.json").read_text())
    shrunk = published | dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shrunk))
    model.generation_config = GenerationConfig(**LLAMA31_GENERATION)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    model.save_pretrained(dest)
    return dest
