"""The built-in base model `builtin:tiny-chat`: a small Llama pre-trained on the tiny world.

It ships with tunelab (`tunelab/builtin_models/tiny-chat/`, 3 MB): a standard Transformers folder (config.json,
model.safetensors, tokenizer files, chat_template.jinja) that loads through the same `from_pretrained` path as any
hub model. It is shipped, not pre-trained where it is first used, because pre-training carries float rounding into
the weights: 300 steps at a high learning rate made another base on each kind of CPU (Intel or AMD, AVX2 or AVX-512),
and the demo and the tests then measured another model on each machine. `python -m tunelab.builtin FOLDER` builds one
afresh from the seed: the tokenizer and config byte for byte, the weights as this machine's arithmetic rounds them.
The shipped folder's `tunelab-builtin.json` says where and how it was built.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from tunelab.errors import ConfigError

BUILTIN_MODELS = ("tiny-chat",)
SHIPPED = Path(__file__).parent / "builtin_models"
VERSION = "4"
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


def materialise(name: str) -> Path:
    """The folder of a built-in model."""
    if name not in BUILTIN_MODELS:
        raise ConfigError(
            f"model.id: unknown built-in model 'builtin:{name}'; available: "
            + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS)
        )
    return SHIPPED / name


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


def tiny_chat_tokenizer():
    """The built-in base's tokenizer: a byte-level BPE trained on the tiny world's prose and the words of the bundled
    chats and pairs, the same on every machine."""
    from tunelab import tinyworld

    bundled = tinyworld.datasets()
    chat_words = [m["content"] for row in bundled["sft_train.jsonl"] for m in row["messages"]]
    chat_words += [
        row[k][0]["content"] for row in bundled["pref_train.jsonl"] for k in ("prompt", "chosen", "rejected")
    ]
    return _train_tokenizer(tinyworld.pretrain_corpus() + chat_words + ["system user assistant"])


def build_tiny_chat(folder: Path, seed: int = 0) -> None:
    """Pre-train the built-in base from the seed into `folder` (about a minute on 2 cores)."""
    import torch
    from transformers import LlamaConfig

    from tunelab import tinyworld

    started = time.time()
    corpus = tinyworld.pretrain_corpus()
    tokenizer = tiny_chat_tokenizer()
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
    # last-bit difference into another model. Built on one thread, the model is the same however many cores of one
    # kind of CPU build it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, loss = _pretrain(config, tokenizer, corpus, seed)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, max_shard_size="2MB")  # shards under 2 MB each: the weights ship in the repository
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
                # What rounds the weights: the CPU, the kernels torch and MKL chose on it, the library versions.
                "built_on": {
                    "machine": platform.machine(),
                    "cpu": _cpu_name(),
                    "torch": torch.__version__,
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    **{k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR") if k in os.environ},
                },
            },
            indent=2,
        )
    )


def _cpu_name() -> str:
    """The CPU's model name, as Linux reports it (platform.processor() is empty there), or the platform's word."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    destination = Path(sys.argv[1])
    destination.mkdir(parents=True)
    build_tiny_chat(destination)
    print(destination)
