"""LoRA: PEFT adapters on the chosen modules of the chosen layers; the base stays frozen."""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import Scope, init_moves_base
from tunelab.errors import ConfigError, TunelabError
from tunelab.runs import ADAPTER
from tunelab.scopes.base import BaseLoader, MadeElsewhere, ScopeKind

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from torch import nn
    from transformers import Trainer

    from tunelab.scope import LoraTargets, ResolvedScope


ADAPTER_CONFIG = "adapter_config.json"


def adapter_folder(source: Path) -> Path:
    """A run's adapter, or a PEFT adapter folder made elsewhere (adapter_config.json beside its weights)."""
    return source / ADAPTER if (source / ADAPTER).is_dir() else source


class Lora(ScopeKind):
    name = "lora"
    result = ADAPTER
    adds_parameters = True

    def made_elsewhere(self, folder: Path) -> MadeElsewhere | None:
        import json

        from safetensors import safe_open

        if not (folder / ADAPTER_CONFIG).is_file():
            return None
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder / ADAPTER_CONFIG}: cannot be read ({e}); check the file") from e
        if config.get("peft_type") != "LORA":
            raise ConfigError(f"{folder}: holds a {config.get('peft_type')} adapter; tunelab uses LoRA adapters")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise ConfigError(
                f"{folder}: has no adapter_model.safetensors (tunelab loads safetensors only); save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        with safe_open(str(weights), "pt") as f:
            count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        targets = _names(config.get("target_modules"))
        shown = ",".join(targets) if isinstance(targets, list) else targets
        return MadeElsewhere(
            self.name, config.get("base_model_name_or_path"), f"lora r{config.get('r')} {shown}", count
        )

    def in_checkpoint(self, checkpoint: Path) -> Path:
        # The Trainer saves the adapter as PEFT does, in the checkpoint folder itself (a DPO reference adapter in a
        # folder of its own beside it).
        if not (checkpoint / ADAPTER_CONFIG).is_file():
            raise TunelabError(f"{checkpoint}: holds no adapter ({ADAPTER_CONFIG}); give a checkpoint of a LoRA run")
        return checkpoint

    def written_for(self, scope: Scope, model: Callable[[], nn.Module | None]) -> tuple[Scope, str | None]:
        # Fused expert weights (all-linear on Mixtral or Qwen3-MoE) train only without dropout: the default gives way
        # there, but a dropout init wrote out would be the user's, which plan refuses.
        from tunelab.scope import lora_config

        if not scope.lora.dropout or (built := model()) is None:
            return scope, None
        unset = type(scope.lora)(**scope.lora.model_dump(exclude={"dropout"}, exclude_unset=True))
        if lora_config(unset, built).config.lora_dropout != 0.0:
            return scope, None
        without = scope.lora.model_copy(update={"dropout": 0.0})
        return Scope(lora=without), "no dropout (PEFT trains its fused experts without it)"

    def continued(self, model: nn.Module, source: Path, scope: Scope) -> tuple[nn.Module, list[str]]:
        # The adapter keeps its own settings, as training loads it (PeftModel.from_pretrained, trainable).
        from peft import LoraConfig, get_peft_model

        from tunelab.scope import lora_config

        own = lora_config(scope.lora, model).config
        theirs = LoraConfig.from_pretrained(str(adapter_folder(source)))
        theirs.inference_mode = False
        pairs = {
            "r": (theirs.r, own.r),
            "alpha": (theirs.lora_alpha, own.lora_alpha),
            "targets": (_names(theirs.target_modules), _names(own.target_modules)),
            "layers": (theirs.layers_to_transform, own.layers_to_transform),
            "dora": (theirs.use_dora, own.use_dora),
            "rslora": (theirs.use_rslora, own.use_rslora),
            "open": (_names(theirs.modules_to_save), _names(own.modules_to_save)),
            "token rows": (bool(theirs.trainable_token_indices), bool(scope.lora.tokens)),
        }
        if scope.lora.init != "default":  # the adapter has started already: only an init asked for is news
            pairs["init"] = (_init_name(theirs.init_lora_weights), scope.lora.init)
        differs = [f"{k} {a} (scope.lora: {b})" for k, (a, b) in pairs.items() if a != b]
        notes = (
            [f"init_from: the adapter of {source} keeps training with its own settings, not scope.lora's: "
             + "; ".join(differs)]
            if differs
            else []
        )  # fmt: skip
        _started(theirs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            continued = get_peft_model(model, theirs)
        _check_fits(adapter_folder(source), continued)
        return continued, notes

    def token_fix(self, tokens: list[str]) -> str:
        return f"set scope.lora.tokens: [{', '.join(tokens)}]"

    def apply(self, model: nn.Module, scope: Scope, tokenizer=None) -> tuple[nn.Module, ResolvedScope]:
        from peft import PeftModel, get_peft_model
        from peft.tuners.lora.layer import ParamWrapper
        from peft.utils import ModulesToSaveWrapper

        from tunelab.scope import ResolvedScope, find_decoder, layer_index, leaf, lora_config, token_ids

        notes = []
        continuing = isinstance(model, PeftModel)
        if continuing:  # a saved adapter (init_from, loaded trainable): its own config
            config, decoder = model.peft_config["default"], find_decoder(model.get_base_model())
            _started(config)
        else:
            targets = lora_config(scope.lora, model, token_ids(scope.lora.tokens, tokenizer, model))
            config, decoder = targets.config, targets.decoder
            arch = type(model).__name__
            _check_init_fits(scope, model, targets.modules)
            moves_base = scope.lora.moves_base and not next(model.parameters()).is_meta
            if scope.lora.moves_base and not moves_base:  # plan, on the meta device: shapes only, nothing to decompose
                config.init_lora_weights = True
            if config.lora_dropout != scope.lora.dropout:
                notes.append(
                    f"scope.lora.dropout is 0 here, not the default {scope.lora.dropout}: {_why_no_dropout(scope)}"
                )
            if getattr(model, "hf_quantizer", None) is not None:
                from peft import prepare_model_for_kbit_training

                # As bitsandbytes and PEFT intend: norms and the head in float32, input gradients enabled.
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage.*")
                try:
                    model = get_peft_model(model, config)
                except ValueError as e:  # PEFT refuses a module it cannot adapt (Mamba's out_proj and conv1d)
                    first = str(e).strip().splitlines()[0]
                    raise ConfigError(f"scope.lora.targets: PEFT cannot put LoRA on {arch} as asked: {first}") from e
            if moves_base:
                _keep_start(model)
        _expose_bias(model)
        # Fused expert weights are wrapped one parameter inside another (experts.base_layer): name the module.
        adapted = {
            name.removeprefix("base_model.model.").replace(".base_layer", ""): m
            for name, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
        }
        modules = sorted(adapted)
        # Originals trained whole (modules_to_save), each once: a tied lm_head and its embeddings share one copy.
        opened = {
            name.removeprefix("base_model.model."): m.modules_to_save["default"]
            for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, ModulesToSaveWrapper) and "default" in m.modules_to_save
        }
        copies = {id(p): p for m in opened.values() for p in m.parameters() if p.requires_grad}
        # LoRA on a weight outside a linear layer merges it with the update on every forward (a parametrization)
        # (one wrapper a weight, nested where a module has two)
        merged = {
            n.removeprefix("base_model.model."): m.get_param().numel()
            for n, m in model.named_modules()
            if isinstance(m, ParamWrapper)
        }
        if not continuing:
            notes += _left_out(scope, arch, targets, adapted, model.peft_config["default"])
            notes += _full_svd(scope, adapted)
        return model, ResolvedScope(
            kind=self.name,
            layers=sorted({layer_index(n, decoder) for n in modules} - {None}),
            target_modules=sorted({leaf(n) for n in modules}),
            lora_modules=modules,
            adapter=describe(config, scope.lora.init if not continuing else "default", scope.lora.loraplus_ratio),
            trained_tokens=[] if continuing else scope.lora.tokens,
            opened_modules=sorted(opened),
            opened_params=sum(p.numel() for p in copies.values()),
            dora_features=sum(m.out_features for m in adapted.values() if m.use_dora.get("default")),
            merged_params=sum(merged.values()),
            merged_layers=len({layer_index(n, decoder) for n in merged}),
            layers_pattern=config.layers_pattern if isinstance(config.layers_pattern, str) else None,
            warnings=notes,
        )

    def save(self, model: nn.Module, state: dict[str, torch.Tensor], trainable: list[str], run_dir: Path) -> None:
        # Only the trained adapter: DPO may have added a frozen "ref" copy beside it.
        start = _STARTS.get(model)
        if start is None:
            model.save_pretrained(run_dir / ADAPTER, selected_adapters=["default"], state_dict=state)
            return
        # An adapter that started from the weights' principal components (PiSSA, OLoRA) is saved as the plain LoRA
        # that gives the same model on the original weights: its trained pairs beside its start, negated (rank 2r;
        # PEFT's conversion, which reads the model's own tensors: read_inputs refuses a sharding engine).
        model.save_pretrained(
            run_dir / ADAPTER,
            selected_adapters=["default"],
            path_initial_model_for_weight_conversion=str(Path(start.name) / "start"),
        )

    def trained(self, run_dir: Path, base: BaseLoader, trainable: bool = False) -> nn.Module:
        from peft import PeftModel

        with _loads(adapter_folder(run_dir)):
            return PeftModel.from_pretrained(base.load(), str(adapter_folder(run_dir)), is_trainable=trainable)

    def attach(self, model: nn.Module, run_dir: Path, name: str) -> nn.Module:
        from peft import PeftModel

        with _loads(adapter_folder(run_dir)):
            if isinstance(model, PeftModel):
                model.load_adapter(str(adapter_folder(run_dir)), adapter_name=name)
                return model
            return PeftModel.from_pretrained(model, str(adapter_folder(run_dir)), adapter_name=name).eval()

    def batches_with_base(self, model: nn.Module, name: str) -> bool:
        # PEFT routes the rows of one batch to different adapters, but not to a DoRA adapter, and not at all through
        # an opened original module other than a linear layer or an embedding (a norm), through trained token rows
        # (the rows of the adapters without them fail) or through LoRA on a weight outside a linear layer (fused
        # experts), whichever adapter brought them.
        from peft.tuners.lora.layer import ParamWrapper
        from peft.utils import ModulesToSaveWrapper
        from peft.utils.other import TrainableTokensWrapper
        from torch import nn

        opened = [m.original_module for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        routable = all(isinstance(m, (nn.Linear, nn.Embedding)) for m in opened) and not any(
            isinstance(m, TrainableTokensWrapper | ParamWrapper) for m in model.modules()
        )
        return routable and not model.peft_config[name].use_dora

    @contextlib.contextmanager
    def active(self, model: nn.Module, run_dir: Path, name: str, base: BaseLoader) -> Iterator[nn.Module]:
        model.set_adapter(name)
        yield model

    def label(self, scope: Scope, target_modules: list[str], layers: str) -> str:
        lora = scope.lora
        named = (
            ("rslora", lora.rslora),
            ("dora", lora.dora),
            (lora.init, lora.init != "default"),
            (f"lora+{lora.loraplus_ratio:g}" if lora.loraplus_ratio else "", lora.loraplus_ratio),
        )
        variants = "".join(f" {v}" for v, on in named if on)
        opened = f" +{','.join(lora.open)}" if lora.open else ""
        tokens = f" +{len(lora.tokens)} token rows" if lora.tokens else ""
        return f"lora r{lora.r}{variants} {','.join(target_modules)} layers {layers}{opened}{tokens}"

    def export(self, run_dir: Path, out: Path, merge: bool, base: BaseLoader) -> tuple[nn.Module | None, str]:
        verify_adapter(run_dir / ADAPTER)
        if merge:
            from peft import PeftModel

            model = base.load()
            if getattr(model, "hf_quantizer", None) is not None:
                # The adapter learned against the quantized weights: merge it into their dequantized values (in the
                # compute dtype), which is the model that trained, not into the original full-precision weights.
                model = model.dequantize()
            return PeftModel.from_pretrained(model, str(run_dir / ADAPTER)).merge_and_unload(), "merged"
        shutil.copytree(run_dir / ADAPTER, out)
        return None, "adapter"


def loraplus_optimizer(trainer: Trainer, ratio: float) -> torch.optim.Optimizer:
    """LoRA+: train.optimizer (the class and settings the Trainer would build) over PEFT's LoRA+ groups: B matrices at
    `ratio` times the learning rate, weight decay as train.weight_decay. Built over the parameters that train (float32
    master copies already), before the Trainer would build its own."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    cls, settings = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    if "params" in settings or not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"scope.lora.loraplus_ratio: train.optimizer {trainer.args.optim} chooses its own parameter groups, which "
            "LoRA+ sets; use an AdamW optimizer (the default, adamw_8bit, paged_adamw_8bit), or remove loraplus_ratio"
        )
    settings = {k: v for k, v in settings.items() if k != "lr"}
    return create_loraplus_optimizer(
        trainer.model,
        cls,
        lr=trainer.args.learning_rate,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=trainer.args.weight_decay,
        **settings,
    )


# PiSSA and OLoRA adapters' starts, kept until the trained adapter is saved (a folder for each model being trained).
_STARTS: weakref.WeakKeyDictionary[nn.Module, tempfile.TemporaryDirectory] = weakref.WeakKeyDictionary()


def _keep_start(model: nn.Module) -> None:
    """PiSSA and OLoRA took the adapter's start out of the frozen weights (W = W_res + BA). As PEFT intends, that start
    is saved, to convert the trained adapter to one for the original weights; and from here on the config says the
    plain init, so that nothing takes the start out of the weights a second time: not TRL's frozen "ref" copy of the
    adapter (DPO, KTO and GRPO add it with this config), not a load of a checkpoint or of the saved adapter."""
    model.peft_config["default"].init_lora_weights = True
    folder = tempfile.TemporaryDirectory(prefix="tunelab-lora-start-")
    model.save_pretrained(Path(folder.name) / "start", selected_adapters=["default"])
    _STARTS[model] = folder


# The batches EVA may read before every layer's components must have settled. PEFT reads until they do; this bounds
# a start that would never settle. On the built-in model they settled after 69 batches of 2 examples, 524 of 1, and
# 27 packed rows (8 a pass over the data, so a small dataset takes several passes).
EVA_PASSES, EVA_BATCHES = 20, 5000


def _started(config: LoraConfig) -> None:
    """A saved adapter that EVA started (its config says init: eva) has started: it goes on from its weights, and
    nothing starts it from the data again."""
    if config.init_lora_weights == "eva":
        config.init_lora_weights, config.eva_config = True, None


def waits_for_eva(model: nn.Module) -> bool:
    """Whether the adapter being trained waits for EVA (init: eva) to start it, before the first step. An adapter
    continued from init_from's run has started already (it keeps its own config)."""
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and config.init_lora_weights == "eva"


def run_eva(trainer: Trainer) -> None:
    """init: eva: each adapted layer's A starts as the top-r right singular vectors of the inputs that layer sees on
    the training batches (the supervised tokens, as PEFT's language-modelling default picks them), B at zero, so
    step 0 is still the base: PEFT's initialize_lora_eva_weights, which reads batches in the data's order until
    every layer's components settle. Every process reads the same batches and starts alike."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    from torch.utils.data import DataLoader

    batches = DataLoader(
        trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator
    )
    limit, taken, most = min(EVA_PASSES * len(batches), EVA_BATCHES), 0, 0

    def forward(model: nn.Module, inputs: dict) -> object:
        nonlocal taken, most
        if taken == limit:
            raise _unsettled(model.peft_config["default"].r, most, taken, len(batches))
        taken += 1
        most = max(most, int((inputs["labels"] != -100).sum()))
        return model(**inputs)

    # PEFT prints each batch too small for the rank, and warns of the collator's count of items (an int) it
    # does not move to the device.
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="input of type .* could not be moved to the correct device")
        initialize_lora_eva_weights(
            trainer.model, batches, forward_fn=forward, gather_distributed_inputs=False, show_progress_bar=False
        )


def eva_too_few(r: int, batches: str) -> str:
    """EVA's batches have fewer supervised tokens than the rank (PEFT skips such a batch): what `batches` says of them,
    and the settings that change it."""
    return (
        f"scope.lora.init: EVA takes r = {r} directions from each training batch's supervised tokens, and {batches}; "
        "lower scope.lora.r, raise train.micro_batch_size, or use init: default"
    )


def _unsettled(r: int, most: int, taken: int, batches: int) -> TunelabError:
    """EVA read its passes and some layer's components still moved: a batch with fewer supervised tokens than the
    rank adds nothing to them (PEFT skips it)."""
    if most < r:
        return TunelabError(eva_too_few(r, f"no batch has that many (the most: {most})"))
    return TunelabError(
        f"scope.lora.init: EVA's components did not settle in {taken} forward passes over the {batches} training "
        "batches; use init: default"
    )


def _check_init_fits(scope: Scope, model: nn.Module, modules: list[str]) -> None:
    """PEFT's OLoRA decomposes a weight as stored, and GPT-2-style Conv1D layers store theirs transposed: the start it
    takes out of them is not the one the adapter adds back (the model changes, or a forward fails on the shapes)."""
    from tunelab.scope import leaf

    if scope.lora.init != "olora":
        return
    stored = [n for n in modules if type(model.get_submodule(n)).__name__ == "Conv1D"]
    if stored:
        raise ConfigError(
            f"scope.lora.init: olora decomposes each weight as stored, and {type(model).__name__} stores "
            f"{leaf(stored[0])} transposed (a Conv1D layer), which PEFT's OLoRA gets wrong; use init: pissa, which "
            "transposes it, or default"
        )


def _full_svd(scope: Scope, adapted: dict[str, nn.Module]) -> list[str]:
    """init: pissa decomposes every adapted weight whole when the model loads: on a 7-8B model that is minutes on a
    GPU and far longer on a CPU, where the fast SVD takes seconds."""
    import torch

    if scope.lora.init != "pissa":
        return []
    bases = [m.get_base_layer() for m in adapted.values()]
    weights = [b.weight for b in bases if isinstance(getattr(b, "weight", None), torch.Tensor)]
    if sum(w.numel() for w in weights) < FULL_SVD_WARNING:
        return []
    largest = max(weights, key=lambda w: w.numel())
    return [
        f"scope.lora.init: pissa runs a full SVD of each of the {len(weights)} adapted weights (up to "
        f"{largest.shape[0]}x{largest.shape[1]}) as the model loads, minutes on a GPU and far longer on a CPU; "
        "pissa_niter_16 (a fast SVD) takes seconds and trains about the same"
    ]


FULL_SVD_WARNING = 1 << 28  # adapted weight elements (268M, a 1B model's linear layers) past which plan warns


def _why_no_dropout(scope: Scope) -> str:
    from tunelab.scope import targets_words

    if scope.lora.parameters:
        return "PEFT trains scope.lora.parameters only without dropout"
    return (
        f"{targets_words(scope.lora)} reaches the fused expert weights, which PEFT trains only without dropout "
        "(targets: attention keeps the experts out)"
    )


def _left_out(scope: Scope, arch: str, targets: LoraTargets, adapted: dict, config: LoraConfig) -> list[str]:
    """What the scope meant to train and PEFT left frozen, as warnings: linear modules its MoE name conversion
    dropped, and fused expert weights that all-linear or mlp does not reach on this architecture."""
    from tunelab.scope import expert_suffixes, matches

    notes = []
    if targets.refused:
        notes.append(
            f"{scope.lora.targets} leaves out {', '.join(targets.refused)} on {arch}: LoRA cannot go on them in this "
            "architecture (PEFT refuses a Mamba mixer's output projection; a router that returns more than a tensor "
            "crashes its layer)"
        )
    missed = [n for n in targets.modules if n not in adapted]
    if missed:
        notes.append(
            f"PEFT attached no LoRA to {len(missed)} of the linear modules the targets chose on {arch} "
            f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}): its conversion of Transformers 4 MoE "
            "names maps these names to the routed experts (huggingface/peft#3711); they stay frozen"
        )
    reached = list(config.target_parameters or [])
    frozen = [n for n in targets.experts if not any(matches(n, t) for t in reached)]
    if frozen and scope.lora.targets in ("all-linear", "mlp") and not scope.lora.parameters:
        suffixes = expert_suffixes(frozen, targets.decoder)
        notes.append(
            f"{scope.lora.targets} leaves {arch}'s fused expert weights frozen ({suffixes}): they are not linear "
            f"layers and PEFT's all-linear does not reach them here; set scope.lora.parameters: [{suffixes}] to train "
            "them with LoRA"
        )
    return notes


def _expose_bias(model: nn.Module) -> None:
    """TRL's SFT computes the loss from `lm_head.weight` and `lm_head.bias` directly (its fused head); PEFT's
    trainable-token wrapper answers `weight` (with the trained rows) but not `bias`. Give each wrapper its original
    module's bias as a plain attribute (not a second registered parameter)."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


def describe(config: LoraConfig, init: str = "default", loraplus_ratio: float | None = None) -> str:
    """'r 16, alpha 32 (scale 2)': the update is scaled by alpha/r, or alpha/sqrt(r) with rsLoRA; then the variants,
    an init other than PEFT's default (a PiSSA or OLoRA adapter is saved as plain LoRA of rank 2r), and LoRA+."""
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
    variants = [v for v, on in (("rsLoRA", config.use_rslora), ("DoRA", config.use_dora)) if on]
    if init != "default":
        saved = f", saved as plain LoRA r {2 * config.r}" if init_moves_base(init) else ""
        variants.append(f"{init} init{saved}")
    if loraplus_ratio:
        variants.append(f"LoRA+ (B at {loraplus_ratio:g}x the learning rate)")
    return f"r {config.r}, alpha {config.lora_alpha:g} (scale {scale:.3g})" + "".join(f", {v}" for v in variants)


def verify_adapter(folder: Path) -> None:
    """Check an adapter folder before shipping it: its weights file reads whole, and every LoRA pair is there
    with the rank its config gives."""
    import json

    from safetensors import SafetensorError, safe_open

    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not (weights.is_file() and config.is_file()):
        raise TunelabError(f"{folder}: the adapter is incomplete (no adapter_model.safetensors or adapter_config.json)")
    r = json.loads(config.read_text()).get("r")
    try:
        with safe_open(str(weights), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError) as e:
        raise TunelabError(f"{weights}: unreadable ({e}); the adapter is damaged, retrain or restore it") from e
    a_names = [n for n in tensors if ".lora_A." in n]
    if not a_names:
        raise TunelabError(f"{weights}: holds no LoRA weights; the adapter is damaged")
    for a in a_names:
        b = a.replace(".lora_A.", ".lora_B.")
        if b not in tensors:
            raise TunelabError(f"{weights}: {a} has no {b}; the adapter is damaged")
        rank = tensors[a].shape[0]
        if r and rank % r and r % rank:  # fused experts may carry a multiple of r (PEFT's rank_pattern)
            raise TunelabError(f"{weights}: {a} has rank {rank}, the config says {r}; the adapter is damaged")


def _init_name(init: bool | str) -> str:
    """PEFT's init_lora_weights as scope.lora.init names it (True: default)."""
    return "default" if init is True else str(init)


def _names(targets: list[str] | set[str] | str | None) -> list[str] | str | None:
    """PEFT's target_modules as one comparable value (a list or set of names sorted; a pattern as it is)."""
    return sorted(targets) if isinstance(targets, list | set) else targets


@contextlib.contextmanager
def _loads(folder: Path) -> Iterator[None]:
    """An adapter whose tensors do not fit the base it goes on (trained on another model than its config names) as
    one line, not PEFT's list of every mismatch."""
    try:
        yield
    except RuntimeError as e:
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise ConfigError(
            f"{folder}: its tensors do not fit this base model, so it was trained on another ({mismatch})"
        ) from e


def _check_fits(folder: Path, model: nn.Module) -> None:
    """Plan: the saved adapter's tensor shapes against the ones its config builds on this base (meta device)."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return
    shapes = {n.replace(".default.", "."): tuple(p.shape) for n, p in model.named_parameters()}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            saved, built = tuple(f.get_slice(key).get_shape()), shapes.get(key)
            if built is not None and built != saved:
                raise ConfigError(
                    f"{folder}: its tensors do not fit this base model, so it was trained on another ({key}: "
                    f"{list(saved)} saved, {list(built)} here)"
                )
