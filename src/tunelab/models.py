"""Load base models and tokenizers, or build a model on the meta device for planning.

Hub ids, local folders and `builtin:` models all end in the same `from_pretrained` calls.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import BUILTIN_PREFIX, ModelSettings, Quantization, TokenizerSettings
from tunelab.errors import ConfigError, disk_full
from tunelab.runs import free_bytes

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


def model_path(model_id: str) -> str:
    """The folder or hub id that `from_pretrained` receives; built-in models are materialised first."""
    if model_id.startswith(BUILTIN_PREFIX):
        from tunelab.builtin import materialise

        return str(materialise(model_id.removeprefix(BUILTIN_PREFIX)))
    return model_id


def _looks_local(model_id: str) -> bool:
    return model_id.startswith(("/", ".", "~")) or Path(model_id).exists()


@functools.cache
def offline_unless_reachable(repo_id: str, repo_type: str = "model") -> None:
    """Ask the hub about a hub model (or dataset) once; where it cannot be reached, go on in offline mode (from the
    local cache) for the rest of the process and the processes it starts, instead of letting each file's lookup retry
    for half a minute. HF_HUB_OFFLINE=1 skips the question."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if _looks_local(repo_id) or constants.HF_HUB_OFFLINE:
        return
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S)
        return
    except (HfHubHTTPError, ValueError):  # the hub answered (not found, gated, ...): the loader says it well
        return
    except Exception as e:  # noqa: BLE001 - anything else is the network: refused, unresolved, timed out
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "datasets" in sys.modules:  # datasets copies the switch when it is imported
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    from tunelab.distributed import is_main

    if is_main():
        print(
            f"-> the model hub cannot be reached ({reason}): {repo_id} from the local cache "
            "(HF_HUB_OFFLINE=1 skips this check)",
            flush=True,
        )


HUB_TIMEOUT_S = 10

# What from_pretrained reads from a hub repository, at its top level: configs, safetensors weights, tokenizer and
# template files. (Meta's Llama repositories also hold original/, a second copy of the weights in Meta's format.)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def download(settings: ModelSettings, shown: bool) -> str | None:
    """A hub model's files in the local Hugging Face cache, fetched first where they are missing, with the download
    on the terminal when `shown`: from_pretrained's own progress bars are off (console.py), and an 8B checkpoint is
    16 GB. Returns the snapshot folder (its name is the commit), the cached one where the hub cannot be asked; None
    for local folders and built-in models, or where neither has it (from_pretrained then says why in its words)."""
    path = model_path(settings.id)
    if _looks_local(path):
        return None
    from huggingface_hub import constants, snapshot_download
    from tqdm.auto import tqdm

    offline_unless_reachable(path)

    offline = constants.HF_HUB_OFFLINE
    files = dict(repo_id=path, revision=settings.revision, allow_patterns=HUB_FILES, ignore_patterns=["*/*"])
    try:
        listed = [] if offline else snapshot_download(**files, dry_run=True)
    except (OSError, ValueError):  # the hub cannot be asked (no network, a gated repo without a token)
        offline, listed = True, []
    if listed and not any(f.filename.endswith(".safetensors") for f in listed):  # pickled weights alone, if any
        raise ConfigError(_no_safetensors(settings.id, []))
    missing = [f for f in listed if f.will_download]
    size = sum(f.file_size for f in missing)
    amount = f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    free = free_bytes(Path(constants.HF_HUB_CACHE)) if missing else None
    if free is not None and size > free:
        raise ConfigError(
            f"model.id: '{settings.id}' needs {amount} more in {constants.HF_HUB_CACHE} ({len(missing)} files), and "
            f"that disk has {free / 1e6:,.0f} MB free; free space there, or set HF_HOME to a folder on a larger disk"
        )
    if missing and shown:
        print(
            f"-> downloading {settings.id}: {len(missing)} files, {amount}, into {constants.HF_HUB_CACHE}", flush=True
        )
    try:
        return snapshot_download(**files, local_files_only=offline, tqdm_class=tqdm if missing and shown else None)
    except (OSError, ValueError) as e:  # not in the cache either
        if disk_full(e):
            raise ConfigError(
                f"model.id: the disk filled while downloading '{settings.id}' into {constants.HF_HUB_CACHE}; free "
                "space there (or set HF_HOME to a folder on a larger disk) and run it again: the files already "
                "downloaded stay"
            ) from e
        return None


def weights_path(settings: ModelSettings, shown: bool = False) -> str:
    """Where the base model's weights load from: a local folder, or a hub model's snapshot folder (downloaded)."""
    return download(settings, shown) or model_path(settings.id)


def gated_refusal(key: str, repo_id: str, error: BaseException, repo_type: str = "model") -> ConfigError | None:
    """Where a load failed because the hub repository is gated, what to do about it, in one line."""
    from huggingface_hub.errors import GatedRepoError

    if not caused_by(error, GatedRepoError) and "is a gated dataset" not in str(error):  # datasets: its own, from None
        return None
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    return ConfigError(
        f"{key}: '{repo_id}' is a gated repository: accept its license at {page} while logged in, then log in here "
        "(hf auth login, or set HF_TOKEN)"
    )


def uncached_refusal(key: str, repo_id: str, revision: str | None = None, repo_type: str = "model") -> ConfigError:
    """A hub repository neither in the local cache nor reachable, and how to get it, in one line."""
    at, flags = (f" at revision '{revision}'", f" --revision {revision}") if revision else ("", "")
    flags = (" --repo-type dataset" if repo_type == "dataset" else "") + flags
    return ConfigError(
        f"{key}: '{repo_id}'{at} is not in the local cache and the hub cannot be reached; download it where there is "
        f"a network (hf download {repo_id}{flags} --local-dir FOLDER) and point {key} at that folder"
    )


def caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a `kind`."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__ or cause.__context__
    return cause is not None


def _hub_refusal(key: str, model_id: str, what: str, error: Exception, revision: str | None = None) -> ConfigError:
    """A load that failed, as one line; a gated hub repository, or one neither cached nor reachable (at `revision`,
    where one is pinned), says what to do about it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if (gated := gated_refusal(key, model_id, error)) is not None:
        return gated
    if caused_by(error, LocalEntryNotFoundError):
        return uncached_refusal(key, model_id, revision)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"{key}: cannot load {what}'{model_id}': {first}")


def load_config(settings: ModelSettings) -> PretrainedConfig:
    from transformers import AutoConfig, PretrainedConfig

    path = model_path(settings.id)
    offline_unless_reachable(path)
    if path.endswith(".gguf") and Path(path).is_file():
        raise ConfigError(
            f"model.id: '{path}' is a GGUF file, llama.cpp's format for inference (its weights quantized for it); "
            "training starts from the model's own checkpoint: set model.id to its hub id or a folder of its "
            "safetensors (a GGUF's model card names the model it was converted from)"
        )
    if _looks_local(path) and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.id: no config.json in '{path}'; point model.id at a model folder or a hub id")
    try:
        config = AutoConfig.from_pretrained(
            path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
        )
    except (OSError, ValueError) as e:
        if "contains custom code which must be executed" in str(e):
            raise ConfigError(
                f"model.id: '{settings.id}' needs modelling code of its own (its config.json's auto_map), which "
                "tunelab runs only when told to: read that code, then set model.trust_remote_code: true"
            ) from e
        raise _hub_refusal("model.id", settings.id, "the config of ", e, settings.revision) from e
    text, tied = config.get_text_config(), getattr(config, "tie_word_embeddings", None)
    text_tied = getattr(text, "tie_word_embeddings", None)
    if text is not config and None not in (tied, text_tied) and tied != text_tied:
        # An image-text config whose wrapper does not say whether lm_head is tied: Transformers 5 defaults Mistral 3's
        # wrapper to tied, while Mistral Small's checkpoints (saved by Transformers 4, which read the language
        # model's setting) hold their own lm_head. Read it as they were saved, so plan and training agree.
        raw, _ = PretrainedConfig.get_config_dict(path, revision=settings.revision)
        if "tie_word_embeddings" not in raw:
            config.tie_word_embeddings = text_tied
    return config


def auto_class(config: PretrainedConfig, head: str = "lm") -> type:
    """The Auto class that builds this model with its head: "lm" for the language-model head, "score" for a reward
    model's score head (AutoModelForSequenceClassification).

    AutoModelForCausalLM where Transformers maps the config there (Gemma 3's image-text checkpoints included);
    image-text checkpoints it does not map (Mistral Small 3.x, Qwen2.5-VL) load through AutoModelForImageTextToText,
    whose models generate text the same way. tunelab trains their language model on text.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    kind = getattr(config, "model_type", type(config).__name__)
    architectures = ", ".join(getattr(config, "architectures", None) or ["no architectures"])
    remote = getattr(config, "auto_map", None) or {}
    if head == "score":
        if type(config) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING or "AutoModelForSequenceClassification" in remote:
            return AutoModelForSequenceClassification
        raise ConfigError(
            f"model.id: method reward puts a score head on the base model, and Transformers has none for a '{kind}' "
            f"model ({architectures}, no AutoModelForSequenceClassification); choose a base of another family"
        )
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in remote:
        return AutoModelForCausalLM
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText
    raise ConfigError(
        f"model.id: a '{kind}' model ({architectures}) "
        "does not generate text with a language-model head Transformers knows (AutoModelForCausalLM or "
        "AutoModelForImageTextToText); point model.id at a causal language model"
    )


def score_head(model) -> str | None:
    """The name of a sequence-scoring model's score head (a reward model's `score`), None for any other model."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    return next((name for name in ("score", "classifier") if hasattr(model, name)), None)


def _seqcls_quiet():
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def with_head(config: PretrainedConfig, head: str) -> PretrainedConfig:
    """The config the model with this head is built from: a score head rates a sequence with one number
    (num_labels=1, as TRL's RewardTrainer builds it), on a copy so the caller's config stays as read."""
    if head != "score" or getattr(config, "num_labels", None) == 1:
        return config
    import copy

    scored = copy.deepcopy(config)
    scored.num_labels = 1
    return scored


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False, head: str = "lm") -> PreTrainedModel:
    """The model's modules and parameter shapes, with this head (see `auto_class`), without allocating any weights."""
    import torch

    with torch.device("meta"):
        try:
            return auto_class(config, head).from_config(with_head(config, head), trust_remote_code=trust_remote_code)
        except ImportError as e:
            raise _missing_package(config, e) from e


def _missing_package(config: PretrainedConfig, error: ImportError) -> ConfigError:
    """Transformers models that need another package (Gemma 3n's vision tower needs timm) say so at build time."""
    first = " ".join(str(error).split()) or type(error).__name__
    kind = getattr(config, "model_type", type(config).__name__)
    return ConfigError(f"model.id: building a '{kind}' model needs a package that is not installed: {first}")


def pick_device(setting: str) -> str:
    import torch

    if setting != "auto":
        if setting == "cuda" and not torch.cuda.is_available():
            raise ConfigError("model.device: cuda was asked for but no CUDA device is available; use auto or cpu")
        if setting == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("model.device: mps was asked for but MPS is not available; use auto or cpu")
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(setting: str, device: str) -> torch.dtype:
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 autocast on CPUs without native support is an order of magnitude slower; MPS fp16 training is fragile.
    return torch.float32


def load_model(
    settings: ModelSettings,
    dtype: torch.dtype,
    device: str,
    config: PretrainedConfig | None = None,
    weights: str | None = None,
    head: str = "lm",
) -> PreTrainedModel:
    """The base model's weights, with this head (see `auto_class`; a new score head starts from the seed set before);
    `config` and `weights` (weights_path's answer), when the caller has them already, are not read or asked again."""
    from tunelab.distributed import is_main

    path = weights or weights_path(settings, shown=is_main())
    config = with_head(config if config is not None else load_config(settings), head)
    kwargs = {"config": config}
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per process under torchrun
    stored = stored_quantization(config)
    if stored is not None and stored.get("quant_method") in DEQUANTIZED:
        import transformers

        kwargs["quantization_config"] = getattr(transformers, DEQUANTIZED[stored["quant_method"]])(dequantize=True)
    if settings.quantization is not None:
        # Quantized weights are placed while they load; a quantized model cannot be moved afterwards.
        kwargs["quantization_config"] = bnb_config(settings.quantization, dtype, device)
        kwargs["device_map"] = {"": device}
        if stored is not None:
            # A checkpoint stored by bitsandbytes loads with its own config (Transformers ignores the one passed):
            # the compute dtype is the one this run computes in.
            check_stored_quantization(settings, config)
            computes = kwargs.pop("quantization_config").to_dict()["bnb_4bit_compute_dtype"]
            config.quantization_config = stored | {"bnb_4bit_compute_dtype": computes}
    # A score head put on a checkpoint without one (a reward model's base) starts new: it, and the checkpoint's unused
    # lm_head, are expected, and TRL's filter keeps Transformers' report quiet. A checkpoint that is a scorer already
    # (a published reward model) must hold its head.
    scorer = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    new_head = head == "score" and not scorer
    quiet = _seqcls_quiet() if new_head else contextlib.nullcontext()
    try:
        with quiet:
            model, info = auto_class(config, head).from_pretrained(
                path,
                revision=settings.revision,
                dtype=dtype,
                trust_remote_code=settings.trust_remote_code,
                use_safetensors=True,
                output_loading_info=True,
                **kwargs,
            )
    except OSError as e:
        if "no file named model.safetensors" in str(e):  # a hub repository with pickled weights alone
            raise ConfigError(_no_safetensors(settings.id, _pickles(Path(path)))) from e
        raise _hub_refusal("model.id", settings.id, "", e, settings.revision) from e
    except ImportError as e:
        raise _missing_package(config, e) from e
    if path != model_path(settings.id):
        # Loaded from the hub cache's snapshot folder (named by its commit): named by its hub id and commit, as
        # from_pretrained(id) names a model, so an adapter saved from it names a base that loads on any machine, at
        # the commit it trained on (PEFT's base_model_name_or_path and revision).
        model.name_or_path = model.config.name_or_path = settings.id
        model.config._commit_hash = Path(path).name
    # A new score head starts random, as every new head does: it is what a reward model trains.
    fresh = score_head(model) if new_head else None
    missing = sorted(k for k in info.get("missing_keys") or [] if fresh is None or not k.startswith(f"{fresh}."))
    if missing:
        raise ConfigError(
            f"model.id: the weights in '{settings.id}' lack {len(missing)} tensor(s) its config.json asks for "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which would start random; "
            "check that the folder holds the whole checkpoint and the config.json that belongs to it"
        )
    backbone_found(model)
    if settings.quantization is None:
        return model.to(device)
    if device == "cpu":
        keep_4bit_layout(model)
    return model


def backbone_found(model: PreTrainedModel) -> None:
    """Point a model's base_model at its backbone where the class's name for it names nothing. Llama4ForCausalLM
    calls its backbone language_model (its prefix in the image-text checkpoints it loads from) and holds it as
    `model`: its base_model was the whole model, and TRL's fused LM head, which runs base_model for the hidden states,
    failed every method's first step ('MoeCausalLMOutputWithPast' object has no attribute 'last_hidden_state').
    Set on the instance, after loading, so the class's name still reads the checkpoint."""
    from torch import nn

    prefix = model.base_model_prefix
    if prefix and not hasattr(model, prefix) and isinstance(getattr(model, "model", None), nn.Module):
        model.base_model_prefix = "model"


# What checkpoints name weights saved as PyTorch pickles rather than safetensors.
PICKLED = ("pytorch_model*.bin", "model*.bin", "consolidated*.pth")


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for pattern in PICKLED for p in folder.glob(pattern)) if folder.is_dir() else []


def check_weight_files(settings: ModelSettings) -> None:
    """A local model folder whose weights are PyTorch pickles alone is refused before anything loads (a folder with
    config.json alone still plans)."""
    folder = Path(model_path(settings.id))
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and (pickles := _pickles(folder)):
        raise ConfigError(_no_safetensors(settings.id, pickles))


def _no_safetensors(model_id: str, pickles: list[str]) -> str:
    shown = ", ".join(pickles[:2]) + (", ..." if len(pickles) > 2 else "")
    held = f"only as PyTorch pickles ({shown})" if pickles else "in no safetensors file"
    return (
        f"model.id: '{model_id}' holds its weights {held}; tunelab loads safetensors only (unpickling can run "
        "code): convert them once, from a copy you trust, with AutoModelForCausalLM.from_pretrained(it)"
        ".save_pretrained(new_folder), and set model.id to the new folder"
    )


def keep_4bit_layout(model: PreTrainedModel) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place for its fast kernel the first time the
    layer runs in eval mode without gradients (an eval pass before training). PEFT's merge then dequantizes bytes in
    a layout it does not know (the merged export came out wrong) and the frozen weights look changed to the run's
    tensor check. The layers keep the one layout that training and saving use (bitsandbytes' own switch)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# Checkpoints stored in a quantized form that takes no gradient and that Transformers can expand at load time:
# OpenAI's gpt-oss (MXFP4 experts) and FP8 checkpoints (DeepSeek-V3, Qwen3-*-FP8, compressed-tensors). They load
# dequantized into the model's dtype, as OpenAI's fine-tuning recipe loads gpt-oss (Mxfp4Config(dequantize=True)),
# whatever kernels happen to be installed.
DEQUANTIZED = {"mxfp4": "Mxfp4Config", "fp8": "FineGrainedFP8Config", "compressed-tensors": "CompressedTensorsConfig"}


def stored_quantization(config: PretrainedConfig) -> dict | None:
    """The quantization its checkpoint is stored in (config.json's quantization_config), or None."""
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    return dict(stored) if isinstance(stored, dict) else stored.to_dict()


def bitsandbytes_stored(stored: dict) -> Quantization | None:
    """A bitsandbytes checkpoint's settings (unsloth's *-bnb-4bit bases), as model.quantization writes them."""
    if stored.get("load_in_8bit"):
        return Quantization(bits=8)
    if stored.get("load_in_4bit"):
        return Quantization(
            bits=4,
            type=stored.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)),
        )
    return None


def check_stored_quantization(settings: ModelSettings, config: PretrainedConfig) -> None:
    """Refuse, in one line with the fix, a checkpoint stored quantized in a way the experiment does not say: a
    bitsandbytes checkpoint trains LoRA on its packed weights (QLoRA), so model.quantization must say so (plan counts
    its memory and the manifest records it from there); a method tunelab cannot train on or expand is named."""
    stored = stored_quantization(config)
    if stored is None:
        return
    if stored.get("quant_method") in DEQUANTIZED:
        if settings.quantization is not None:
            raise ConfigError(
                f"model.quantization: '{settings.id}' is stored in {stored['quant_method']}, which loads decoded "
                "into the model's dtype and cannot be packed again by bitsandbytes; remove model.quantization"
            )
        return
    packed = bitsandbytes_stored(stored)
    if packed is None:
        raise ConfigError(
            f"model.id: '{settings.id}' is stored quantized with {stored.get('quant_method', 'an unknown method')}, "
            "which tunelab does not train on; use the unquantized checkpoint (model.quantization: {bits: 4} "
            "quantizes it as it loads, for QLoRA)"
        )
    line = (
        "{bits: 8}"
        if packed.bits == 8
        else f"{{bits: 4, type: {packed.type}, double_quant: {str(packed.double_quant).lower()}}}"
    )
    given = settings.quantization
    if given is None:
        raise ConfigError(
            f"model.id: '{settings.id}' is stored in {packed.describe()} by bitsandbytes, so it trains as a quantized "
            f"base; add model.quantization: {line} (LoRA on it, as QLoRA), or use the unquantized checkpoint"
        )
    if (given.bits, given.type, given.double_quant) != (packed.bits, packed.type, packed.double_quant) and not (
        given.bits == packed.bits == 8
    ):
        raise ConfigError(
            f"model.quantization: '{settings.id}' is stored in {packed.describe()}, and its weights load as stored, "
            f"not as {given.describe()}; set model.quantization: {line}, or use the unquantized checkpoint"
        )


def check_quantization(settings: Quantization, device: str, key: str = "model.quantization") -> None:
    """Refuse, with the reason, a quantization the installed bitsandbytes cannot run here; `key` is the setting
    that asked for it."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{key}: needs the bitsandbytes package, which is not installed; "
            "pip install 'tunelab[quantization]' (or bitsandbytes)"
        )
    if device == "mps":
        raise ConfigError(
            f"{key}: bitsandbytes has no complete Apple MPS backend for training; train on cuda or cpu, or remove {key}"
        )


def check_compile(device: str) -> None:
    """Refuse, with the reason, train.compile where torch.compile cannot build its kernels here."""
    import importlib.util
    import shutil

    if device == "mps":
        raise ConfigError(
            "train.compile: tunelab does not compile on Apple MPS (torch.compile's MPS backend is a prototype); "
            "set train.compile: false"
        )
    if device.startswith("cuda") and importlib.util.find_spec("triton") is None:
        raise ConfigError(
            "train.compile: torch.compile builds CUDA kernels with Triton, which is not installed; pip install "
            "triton, or set train.compile: false"
        )
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if device == "cpu" and not any(shutil.which(c) for c in compilers):
        raise ConfigError(
            "train.compile: torch.compile builds CPU kernels with a C++ compiler, and none is on PATH (g++, c++ or "
            "clang++); install one, or set train.compile: false"
        )


def bnb_config(settings: Quantization, dtype: torch.dtype, device: str):
    """Transformers' BitsAndBytesConfig for the experiment's quantization."""
    import torch
    from transformers import BitsAndBytesConfig

    check_quantization(settings, device.split(":")[0])
    if settings.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if settings.compute_dtype == "auto" else getattr(torch, settings.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.type,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


# Mistral's own tokenizer file (Mistral-Nemo, -Small 3.x, Magistral, Devstral), beside or instead of tokenizer.json.
TEKKEN = "tekken.json"


def has_tokenizer(folder: str) -> bool:
    p = Path(folder)
    if not p.is_dir():
        return True  # a hub id: from_pretrained will find out
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", TEKKEN))


def auto_tokenizer(source: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """AutoTokenizer's tokenizer of a folder or hub id, always a Transformers one. Where mistral-common is installed,
    Transformers reads a folder holding Mistral's tekken.json with mistral-common's backend, which renders chats in
    its own code: no chat template to derive the loss masks from, and the template the folder ships beside it
    ignored. Converted from tekken.json where the folder has no tokenizer.json, whatever else is installed."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, mistral_format=False, **kwargs)


def processor_template(source: str, revision: str | None) -> str | None:
    """The chat template an image-text checkpoint keeps for its processor alone (chat_template.json, as
    llava-hf/llava-1.5-7b-hf and other checkpoints saved before Transformers wrote chat_template.jinja have it),
    which the tokenizer does not read; None where there is none."""
    from transformers.utils import cached_file

    path = cached_file(
        source, "chat_template.json", revision=revision, _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )  # fmt: skip
    if path is None:
        return None
    try:
        template = json.loads(Path(path).read_text()).get("chat_template")
    except (ValueError, AttributeError):
        return None
    return template if isinstance(template, str) and template.strip() else None


def load_tokenizer(
    tok: TokenizerSettings, model: ModelSettings, config: PretrainedConfig | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer (the model's own unless tokenizer.id says otherwise) with the chosen chat template and pad.
    `config`: the model's config, when read already (Transformers consults it to pick the tokenizer class)."""
    from tunelab.templates import resolve_template

    source = model_path(tok.id) if tok.id else model_path(model.id)
    offline_unless_reachable(source)
    kwargs = {"config": config} if config is not None and not tok.id else {}
    key = "tokenizer.id" if tok.id else "model.id"
    try:
        tokenizer = auto_tokenizer(
            source, revision=None if tok.id else model.revision, trust_remote_code=model.trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        raise _hub_refusal(key, source, "a tokenizer from ", e, None if tok.id else model.revision) from e
    except ImportError as e:
        if Path(source).is_dir() and (Path(source) / TEKKEN).is_file():
            raise ConfigError(
                f"{key}: '{source}' holds its tokenizer as Mistral's {TEKKEN} alone, which Transformers converts with "
                "the mistral-common package: pip install mistral-common, or set tokenizer.id to a folder with the "
                "model's tokenizer.json"
            ) from e
        raise _hub_refusal(key, source, "a tokenizer from ", e, None if tok.id else model.revision) from e
    template = resolve_template(tok.chat_template, tokenizer)
    if template is None and tok.chat_template is None:
        template = processor_template(source, None if tok.id else model.revision)
    if template is not None:
        tokenizer.chat_template = template
    if tok.pad_token is not None:
        if tok.pad_token not in tokenizer.get_vocab():
            raise ConfigError(f"tokenizer.pad_token: '{tok.pad_token}' is not in the tokenizer's vocabulary")
        tokenizer.pad_token = tok.pad_token
    return tokenizer


def checkpoint_rows(folder: str, name: str, rows: list[int]) -> torch.Tensor | None:
    """Rows of one tensor of a local safetensors checkpoint, read without loading the rest (plan looks at a few
    embedding rows); None where the folder has no weights or no tensor of that name."""
    import torch
    from safetensors import safe_open

    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text()).get("weight_map", {}).get(name)
    else:
        file = "model.safetensors" if (Path(folder) / "model.safetensors").is_file() else None
    if file is None:
        return None
    with safe_open(str(Path(folder) / file), "pt") as f:
        if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            return None
        tensor = f.get_slice(name)
        return torch.cat([tensor[i : i + 1] for i in rows])


def fingerprint(source: str, revision: str | None = None) -> str:
    """Identify a base model (`source`: its folder, see weights_path) by its config and the contents of its weight
    files, so a hub model and a local copy of it are one base.

    Shapes alone cannot tell a base from a merged export of it; the weights' digests can. Digests are cached
    by file path, size and modification time, so an 8B model is hashed once, not at every run.
    """
    path = Path(source)
    if not path.is_dir():  # a hub id whose files could not be fetched
        return hashlib.sha256(f"{source}@{revision or 'main'}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")):
        h.update(weights.name.encode() + file_digest(weights).encode())
    return h.hexdigest()[:16]


def run_fingerprint(run_dir: Path) -> str:
    """A completed run's trained model, fingerprinted: its base's fingerprint and the digests of its trained files
    (checkpoints aside). A run retrained in place is another model."""
    from tunelab.runs import CHECKPOINTS, read_manifest

    manifest = read_manifest(run_dir)
    h = hashlib.sha256((manifest.base_model.fingerprint if manifest.base_model else "").encode())
    for f in sorted(run_dir.rglob("*.safetensors")):
        if CHECKPOINTS not in f.relative_to(run_dir).parts:
            h.update(str(f.relative_to(run_dir)).encode() + file_digest(f).encode())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    from tunelab.builtin import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_root() / "weight-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        cache[key] = h.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only cache only costs the hashing next time
    return cache[key]
