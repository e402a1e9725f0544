"""The built-in base model `builtin:tiny-chat`: a small Llama pre-trained on the tiny world.

It is materialised once into a cache folder (a standard Transformers folder: config.json,
model.safetensors, tokenizer files, chat_template.jinja) and from then on loads through the same
`from_pretrained` path as any hub model. Building it is deterministic from the seed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from tunelab.errors import ConfigError

BUILTIN_MODELS = ("tiny-chat",)
VERSION = "3"
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
TEMPLATE_DIR = Path(__file__).parent / "templates"
PRETRAIN_STEPS = 300


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_HOME", Path.home() / ".cache" / "tunelab"))


def materialise(name: str, seed: int = 0) -> Path:
    """Return the folder of a built-in model, building it first if the cache does not hold it."""
    if name not in BUILTIN_MODELS:
        raise ConfigError(
            f"model.id: unknown built-in model 'builtin:{name}'; available: "
            + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS)
        )
    folder = cache_root() / "models" / f"{name}-v{VERSION}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            # Build beside the final place and rename, so a crash never leaves a half-written model.
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                _build_tiny_chat(tmp, seed)
                tmp.chmod(0o755)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
    )
    wrapped.chat_template = (TEMPLATE_DIR / "llama3.jinja").read_text()
    wrapped.model_max_length = 512
    return wrapped


def _blocks(tokenizer, texts: list[str], size: int) -> list[list[int]]:
    ids: list[int] = []
    for text in texts:
        ids += [
            tokenizer.bos_token_id,
            *tokenizer(text, add_special_tokens=False)["input_ids"],
            tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        ]
    return [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]


def _pretrain(config, tokenizer, corpus: list[str], seed: int):
    """The base's pre-training on the tiny world's prose: (model, last loss)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    blocks = torch.tensor(_blocks(tokenizer, corpus, 128))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps, batch = PRETRAIN_STEPS, 16
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model, loss


def _build_tiny_chat(folder: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig

    from tunelab import tinyworld

    started = time.time()
    corpus = tinyworld.pretrain_corpus()
    bundled = tinyworld.datasets()
    chat_words = [m["content"] for row in bundled["sft_train.jsonl"] for m in row["messages"]]
    chat_words += [
        row[k][0]["content"] for row in bundled["pref_train.jsonl"] for k in ("prompt", "chosen", "rejected")
    ]
    tokenizer = _train_tokenizer(corpus + chat_words + ["system user assistant"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # One thread: a float sum split across threads rounds differently, and 300 steps at this learning rate carry a
    # last-bit difference into another model. Built on one thread, the model is the same however many cores build it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss = _pretrain(config, tokenizer, corpus, seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "tunelab-builtin.json").write_text(
        json.dumps(
            {
                "name": "tiny-chat",
                "version": VERSION,
                "seed": seed,
                "pretrain_steps": PRETRAIN_STEPS,
                "final_pretrain_loss": round(loss.item(), 4),
                "build_seconds": round(time.time() - started, 1),
            },
            indent=2,
        )
    )
