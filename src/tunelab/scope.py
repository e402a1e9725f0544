"""Turn scope intent ("all-linear", "last-half", "last 4 blocks + norm") into explicit names.

The same functions act on a meta-device model (for `plan`) and on the real one (for `train`), so the
plan's counts are the counts training gets. LoRA matching is PEFT's own: tunelab expands presets
into module names and lets `get_peft_model` do the attaching. Applying a scope, saving and loading
its result belong to the scope kinds in `tunelab.scopes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunelab.config import FirstN, LastN, LoraScope, PartialScope
from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

PRESET_NAMES = {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]}
ATTENTION_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
MLP_PARENT = re.compile(r"mlp|feed_?forward|ffn|moe", re.IGNORECASE)
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")


@dataclass
class Decoder:
    path: str  # e.g. "model.layers"
    pattern: str  # the attribute name PEFT's layers_pattern matches, e.g. "layers"
    count: int


@dataclass
class ResolvedScope:
    kind: str
    layers: list[int]
    trainable_params: int = 0
    total_params: int = 0
    trainable_names: list[str] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    adapter: str = ""  # the adapter's form in words: rank, alpha, the scale they give, DoRA
    trained_tokens: list[str] = field(default_factory=list)  # tokens whose embedding rows train beside an adapter
    opened_modules: list[str] = field(default_factory=list)  # originals trained whole beside an adapter
    opened_params: int = 0  # their trainable parameters, kept in the model's dtype (an adapter's are float32)
    dora_features: int = 0  # output features of the DoRA-adapted modules, summed: their outputs are kept for backward
    merged_params: int = 0  # weights LoRA merges with its update each forward (fused experts); backward keeps them
    merged_layers: int = 0  # the layers those weights are in
    layers_pattern: str | None = None
    tied_embeddings: bool = False
    embeddings_train: bool = False  # the input embeddings train (opened, or tied to an opened lm_head)
    warnings: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


# ---------------------------------------------------------------- architecture facts


def text_root(model: nn.Module) -> str:
    """Where the language model sits in `model`: "model" for a causal LM, "model.language_model" for an image-text
    checkpoint (Transformers' `get_decoder`), "" when the model is its own decoder or does not say."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        return ""
    return next((name for name, m in model.named_modules() if m is decoder), "")


def other_towers(model: nn.Module) -> list[str]:
    """Parameter names outside the language model and its input and output embeddings: the vision encoder and
    projector of an image-text checkpoint, which text data cannot train. Empty for a causal LM."""
    from tunelab.models import score_head

    root = text_root(model)
    if not root:
        return []
    head = score_head(model)
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings() if head is None else getattr(model, head)]
    keep = {id(p) for e in embeddings if e is not None for p in e.parameters()}
    return [n for n, p in model.named_parameters() if not n.startswith(root + ".") and id(p) not in keep]


def find_decoder(model: nn.Module, pattern: str | None = None) -> Decoder:
    """The ModuleList that holds the decoder blocks (of the language model, in an image-text checkpoint)."""
    from torch import nn

    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    root = text_root(model)
    candidates = [
        (name, len(m))
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and (n_layers is None or len(m) == n_layers)
        and (not root or name.startswith(root + "."))
    ]
    if pattern is not None:
        candidates = [(n, c) for n, c in candidates if n.split(".")[-1] == pattern]
        if not candidates:
            raise ConfigError(
                f"scope.lora.layers_pattern: no list of decoder layers named '{pattern}' in {type(model).__name__}"
            )
    if not candidates:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; set scope.lora.layers_pattern")
    name, count = min(candidates, key=lambda c: c[0].count("."))
    return Decoder(path=name, pattern=name.split(".")[-1], count=count)


def linear_modules(model: nn.Module) -> list[str]:
    """Full names of the linear modules LoRA can attach to (PEFT's all-linear set: never the output head)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    expanded = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model)
    return sorted(expanded.target_modules)


def refused_by_peft(model: nn.Module, linears: list[str], names: list[str]) -> list[str]:
    """Of `names` (leaf names of `linears`), the ones LoRA cannot go on in this architecture: those PEFT's own check
    refuses (a Mamba mixer's out_proj in Mamba, Falcon-H1 and Nemotron-H), and linear layers whose forward returns
    more than a tensor (the routers of Llama 4 and PhiMoE), which PEFT's LoRA layer crashes on at the first step."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba

    refused = set(_not_tensor_out(model, linears)) & set(names)
    for name in set(names) - refused:
        try:
            _check_lora_target_modules_mamba(LoraConfig(), model, name)
        except ValueError:
            refused.add(name)
    return sorted(refused)


def _not_tensor_out(model: nn.Module, linears: list[str]) -> list[str]:
    """Leaf names of the model's own nn.Linear subclasses whose output is not a tensor, each class run once on 8
    tokens (on the meta device when planning): as a router receives them, flattened (Llama 4's picks its top-k
    experts along the tokens' last dimension but one: one token in a batch, and top-k 2 made the probe fail), else
    as a batch of one sequence."""
    import torch
    from torch import nn

    verdicts: dict[type, bool] = {}
    for name in linears:
        module = model.get_submodule(name)
        kind = type(module)
        if not isinstance(module, nn.Linear) or kind is nn.Linear or not kind.__module__.startswith("transformers."):
            continue  # GPT-2's Conv1D is none, and neither are quantized layers (bitsandbytes')
        if kind in verdicts:
            continue
        verdicts[kind] = False  # a layer that cannot run alone is left to PEFT, as any other
        for shape in ((8, module.in_features), (1, 8, module.in_features)):
            try:
                with torch.no_grad():
                    out = module(torch.zeros(*shape, device=module.weight.device, dtype=module.weight.dtype))
            except Exception:
                continue
            verdicts[kind] = not isinstance(out, torch.Tensor)
            break
    return sorted({leaf(n) for n in linears if verdicts.get(type(model.get_submodule(n)), False)})


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a target given by name: the whole name, or its end after a dot."""
    return name == target or name.endswith("." + target)


def layer_index(name: str, decoder: Decoder) -> int | None:
    prefix = decoder.path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def tied_embeddings(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


# ---------------------------------------------------------------- layers


def layer_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts: list[str] = []
    start = prev = None
    for i in [*indices, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def select_layers(spec: object, count: int, key: str) -> list[int]:
    """Layer indices for all | last-half | first-half | {last: N} | {first: N} | [i, 'a-b', ...]."""
    if spec == "all":
        return list(range(count))
    if spec == "last-half":
        return list(range(count // 2, count))
    if spec == "first-half":
        return list(range(count // 2))
    if isinstance(spec, LastN | FirstN):
        n = spec.last if isinstance(spec, LastN) else spec.first
        if n > count:
            raise ConfigError(f"{key}: asks for {n} layers but this model has {count}")
        return list(range(count - n, count)) if isinstance(spec, LastN) else list(range(n))
    indices: set[int] = set()
    for item in spec:  # type: ignore[union-attr]
        if isinstance(item, str):
            lo, hi = (int(x) for x in item.replace(" ", "").split("-"))
            if lo > hi:
                raise ConfigError(f"{key}: range '{item}' is backwards; write '{hi}-{lo}'")
            indices.update(range(lo, hi + 1))
        else:
            indices.add(item)
    bad = sorted(i for i in indices if i >= count)
    if bad:
        raise ConfigError(f"{key}: layer {bad[0]} is out of range; this model has {count} layers (0-{count - 1})")
    return sorted(indices)


# ---------------------------------------------------------------- LoRA


def inside(model: nn.Module, name: str, parent: re.Pattern, decoder: Decoder) -> bool:
    """Whether module or parameter `name` sits in an attention (or MLP) block: a module on its path is named so
    (self_attn, mlp, block_sparse_moe) or, inside a decoder layer, is of such a class (Nemotron-H's `mixer` is a
    NemotronHAttention in some layers and a NemotronHMOE in others)."""
    parts = name.split(".")[:-1]
    within = len(decoder.path.split(".")) + 1  # the path up to and including the layer index
    classes = [type(model.get_submodule(".".join(parts[:i]))).__name__ for i in range(within + 1, len(parts) + 1)]
    family = type(model).__name__.split("For")[0]  # Qwen3MoeAttention is an attention block of the Qwen3Moe family
    in_decoder = layer_index(name, decoder) is not None
    return any(parent.search(p) for p in parts) or (
        in_decoder and any(parent.search(c.removeprefix(family)) for c in classes)
    )


def presets(model: nn.Module, linears: list[str], decoder: Decoder) -> dict[str, list[str]]:
    """The attention and mlp presets: the leaf names of the linear modules inside each kind of block."""
    return {
        kind: sorted({leaf(n) for n in linears if inside(model, n, parent, decoder)})
        for kind, parent in (("attention", ATTENTION_PARENT), ("mlp", MLP_PARENT))
    }


def expand_targets(
    targets: str | list[str],
    linears: list[str],
    arch: str,
    blocks: dict[str, list[str]],
    experts: bool = False,
    hint: str = "",
) -> tuple[list[str], str | None]:
    """(module-name suffixes, or None) and (a regex, or None) for PEFT's target_modules. `blocks`: the attention and
    mlp presets (see `presets`); `experts`: the model's fused expert weights are reached too (see `fused_experts`), so
    an mlp preset without linear layers is not empty; `hint`: what to add to an error where a preset matches
    nothing."""
    available = sorted({leaf(n) for n in linears})
    listing = f"linear modules in {arch}: {', '.join(available)}"
    if isinstance(targets, list):
        names = targets
    elif targets in PRESET_NAMES:
        names = PRESET_NAMES[targets]
    elif targets == "all-linear":
        return available, None
    elif targets in ("attention", "mlp"):
        names = blocks[targets]
        if not names and not experts:
            raise ConfigError(f"scope.lora.targets: preset '{targets}' matches nothing; {listing}{hint}")
        return names, None
    else:
        try:
            regex = re.compile(targets)
        except re.error as e:
            raise ConfigError(
                f"scope.lora.targets: '{targets}' is neither a preset (qv, qkvo, attention, mlp, "
                f"all-linear) nor a valid regex ({e})"
            ) from e
        if not any(regex.fullmatch(n) for n in linears):
            raise ConfigError(f"scope.lora.targets: regex '{targets}' matches no linear module; {listing}")
        return [], targets
    missing = [n for n in names if not any(matches(m, n) for m in linears)]
    if missing:
        what = f"preset '{targets}' ({', '.join(names)})" if isinstance(targets, str) else "targets"
        attention = blocks["attention"]
        hint = f" (targets: attention gives this model's attention projections: {', '.join(attention)})"
        raise ConfigError(
            f"scope.lora.targets: {what}: {', '.join(missing)} not found; {listing}"
            + (hint if isinstance(targets, str) and attention else "")
        )
    return sorted(names), None


@dataclass
class LoraTargets:
    """What `lora_config` resolved beside PEFT's config: the decoder, the full names of the linear modules it asks PEFT
    to adapt, the fused expert weights in the chosen layers, and the names a preset left out."""

    config: LoraConfig
    decoder: Decoder
    modules: list[str]
    experts: list[str]  # the fused expert weights in the chosen layers, whether or not they train
    refused: list[str]  # module names the preset left out because PEFT refuses them here


def lora_config(scope: LoraScope, model: nn.Module, token_ids: list[int] | None = None) -> LoraTargets:
    """An explicit PEFT LoraConfig: presets expanded into module names, layers into indices; `token_ids`: the ids of
    scope.tokens (see `token_ids`)."""
    from peft import EvaConfig, LoraConfig

    from tunelab.models import score_head

    head = score_head(model)
    decoder = find_decoder(model, scope.layers_pattern)
    layers = select_layers(scope.layers, decoder.count, "scope.lora.layers")
    linears = linear_modules(model)
    towers = bool(other_towers(model))
    if towers:  # an image-text checkpoint: only the language model's linear layers, never the vision encoder's
        linears = [n for n in linears if layer_index(n, decoder) is not None]
    fused, patterns = fused_experts(scope, model, decoder, layers)
    experts = expert_weights(model, decoder, layers)
    hint = f"; its fused expert weights train with scope.lora.parameters: [{expert_suffixes(experts, decoder)}]"
    names, regex = expand_targets(
        scope.targets,
        linears,
        type(model).__name__,
        presets(model, linears, decoder),
        bool(fused),
        hint if experts else "",
    )
    refused = refused_by_peft(model, linears, names) if scope.targets in ("all-linear", "mlp") else []
    names = [n for n in names if n not in refused]  # a preset leaves them out (Lora.apply says so); a list is refused
    chosen = [
        n
        for n in linears
        if (re.fullmatch(regex, n) if regex is not None else any(matches(n, t) for t in names))
        and layer_index(n, decoder) in layers
    ]
    all_layers = layers == list(range(decoder.count))
    if towers or (regex is not None and not all_layers):
        # PEFT cannot combine a regex with layers_to_transform, and a module name alone would also match the
        # vision encoder's q_proj: fold the choice into full module names.
        names, regex = chosen, None
    params = sorted({*fused, *named_parameters(scope.parameters, model, decoder, layers)})
    if params and scope.init == "eva":
        raise ConfigError(
            f"scope.lora.init: {_reaches(scope, model)}, and EVA starts only adapters on linear layers from their "
            f"inputs; use init: default, or {_fix(scope)}"
        )
    if params and scope.dora:
        raise ConfigError(
            f"scope.lora.dora: {_reaches(scope, model)}, which PEFT cannot train with DoRA; {_fix(scope)}"
        )
    dropout = scope.dropout
    if params and dropout:
        if "dropout" in scope.model_fields_set:
            shown = sorted({".".join(n.split(".")[-2:]) for n in params})[:3]
            raise ConfigError(
                f"scope.lora.dropout: {_reaches(scope, model)} ({', '.join(shown)}, ...), which PEFT trains only "
                f"without dropout; set scope.lora.dropout: 0, or {_fix(scope)}"
            )
        dropout = 0.0  # the default gives way where PEFT cannot apply it; Lora.apply says so
    config = LoraConfig(
        r=scope.r,
        lora_alpha=scope.alpha,
        lora_dropout=dropout,
        bias=scope.bias,
        # A reward model: PEFT's sequence-classification task, whose new score head trains whole beside the adapter.
        task_type="SEQ_CLS" if head else scope.task_type,
        target_modules=regex if regex is not None else names,  # empty where only expert weights train (mlp, Mixtral)
        layers_to_transform=None if all_layers or regex is not None else layers,
        layers_pattern=None if all_layers or regex is not None else decoder.pattern,
        target_parameters=params or None,
        rank_pattern=patterns,
        alpha_pattern=patterns and {k: v * scope.alpha / scope.r for k, v in patterns.items()},
        use_dora=scope.dora,
        use_rslora=scope.rslora,
        init_lora_weights=True if scope.init == "default" else scope.init,
        # EVA without rank redistribution (rho 1): every layer keeps rank r, so the adapter's shapes come from the
        # config alone (plan counts them, a resume rebuilds them), not from the data.
        eva_config=EvaConfig(rho=1.0) if scope.init == "eva" else None,
        modules_to_save=sorted({*opened_modules(scope, model, decoder), *([head] if head else [])}) or None,
        trainable_token_indices=token_rows(model, token_ids) if token_ids else None,
        # A tied lm_head and embedding matrix stay one tensor when either opens: trained apart, the merged model
        # would be saved tied again and lose one of them. (PEFT ties trainable token rows on its own.)
        ensure_weight_tying=bool(scope.open) and tied_embeddings(model),
        # The commit of the hub snapshot the base loaded from (None for a local folder): the adapter names the base
        # it trained on, and PEFT's loaders fetch that one, not whatever the hub holds later.
        revision=getattr(model.config, "_commit_hash", None),
    )
    return LoraTargets(config, decoder, chosen, experts, refused)


def targets_words(scope: LoraScope) -> str:
    """How messages name the scope's targets: 'all-linear', 'targets: mlp'."""
    return scope.targets if scope.targets == "all-linear" else f"targets: {scope.targets}"


def _reaches(scope: LoraScope, model: nn.Module) -> str:
    if scope.parameters:
        return "scope.lora.parameters trains weights outside linear layers"
    return f"{targets_words(scope)} on {type(model).__name__} reaches its fused expert weights"


def _fix(scope: LoraScope) -> str:
    if scope.parameters:
        return "drop scope.lora.parameters"
    return "set targets: attention (or a list of module names) to leave the experts out"


def expert_weights(model: nn.Module, decoder: Decoder, layers: list[int]) -> list[str]:
    """Full names of the fused expert weights (3D parameters, one matrix an expert, not a convolution's) in
    `layers`."""
    from torch import nn

    convolutions = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)}
    return [
        n
        for n, p in model.named_parameters()
        if p.dim() == 3 and n not in convolutions and layer_index(n, decoder) in layers
    ]


def expert_suffixes(names: list[str], decoder: Decoder) -> str:
    """Parameter names without their layer ('mlp.experts.down_proj'), as scope.lora.parameters takes them."""
    prefix = decoder.path + "."
    return ", ".join(sorted({n.removeprefix(prefix).split(".", 1)[1] for n in names}))


def named_parameters(suffixes: list[str], model: nn.Module, decoder: Decoder, layers: list[int]) -> list[str]:
    """scope.lora.parameters as full parameter names in `layers`: each suffix must name a parameter that is not a
    linear layer's (those are LoRA's targets), as PEFT's target_parameters matches them."""
    from torch import nn

    if not suffixes:
        return []
    inside_linear = {
        f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.Linear) for p in ("weight", "bias")
    }
    candidates = [
        n for n, _ in model.named_parameters() if layer_index(n, decoder) in layers and n not in inside_linear
    ]
    found = []
    for suffix in suffixes:
        matched = [n for n in candidates if matches(n, suffix)]
        if not matched:
            experts = expert_suffixes(expert_weights(model, decoder, layers), decoder)
            raise ConfigError(
                f"scope.lora.parameters: '{suffix}' names no parameter outside a linear layer in the chosen layers; "
                + (f"fused expert weights here: {experts}" if experts else f"{type(model).__name__} has none")
                + " (linear layers go in scope.lora.targets)"
            )
        found += matched
    return found


def token_ids(tokens: list[str], tokenizer, model: nn.Module) -> list[int]:
    """scope.lora.tokens as ids: each one entry of the tokenizer's vocabulary, with a row in the model."""
    if not tokens:
        return []
    if tokenizer is None:
        raise ConfigError("scope.lora.tokens: needs the model's tokenizer, and the model has none; set tokenizer.id")
    vocab = tokenizer.get_vocab()
    rows = model.get_input_embeddings().weight.shape[0]
    for token in tokens:
        if token not in vocab:
            example = next(iter(tokenizer.all_special_tokens), "")
            raise ConfigError(
                f"scope.lora.tokens: '{token}' is not a token of this tokenizer (one entry of its vocabulary, as "
                f"'{example}' is)"
            )
        if vocab[token] >= rows:
            raise ConfigError(f"scope.lora.tokens: '{token}' is id {vocab[token]}, past the model's {rows} embeddings")
    return sorted({vocab[t] for t in tokens})


def token_rows(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices: the rows in the input embeddings and, when it is not tied to them (PEFT ties
    that one itself), in lm_head, so the model can both read and write the tokens."""
    rows = {module_name(model, model.get_input_embeddings()): ids}
    out = model.get_output_embeddings()  # None for a reward model: its tokens are only read
    if out is not None and not tied_embeddings(model):
        rows[module_name(model, out)] = ids
    return rows


def untrained_tokens(model: nn.Module, ids: set[int], read_rows=None) -> list[int]:
    """Of these token ids, the ones the base never trained: an embedding (or untied lm_head) row near zero beside the
    typical row, as a base model's chat-template tokens are (Llama 3's <|eot_id|> in the base checkpoint).
    `read_rows(parameter_name, rows)`: where the weights are not loaded (plan), the checkpoint's rows by name, or
    None where it has no such tensor."""
    modules = [model.get_input_embeddings()]
    if model.get_output_embeddings() is not None and not tied_embeddings(model):
        modules.append(model.get_output_embeddings())
    found: set[int] = set()
    for module in modules:
        count = module.weight.shape[0]
        wanted = sorted(i for i in ids if i < count)
        sample = sorted({round(k * (count - 1) / 63) for k in range(64)})
        if read_rows is not None:
            rows = read_rows(f"{module_name(model, module)}.weight", wanted + sample)
        else:
            rows = None if module.weight.is_meta else module.weight.detach()[wanted + sample]
        if rows is None or not wanted:
            continue
        norms = rows.float().norm(dim=1)
        typical = norms[len(wanted) :].median()
        found |= {i for i, n in zip(wanted, norms[: len(wanted)].tolist(), strict=True) if n <= UNTRAINED * typical}
    return sorted(found)


UNTRAINED = 1e-3  # a row this much smaller than the typical one never took a gradient


def untrained_note(tokens: list[str], fix: str) -> str:
    return (
        f"the data uses {len(tokens)} token(s) this base never trained (their embedding rows are zero): "
        f"{', '.join(tokens)}; with those rows frozen the model cannot learn to read or write them: {fix}, or start "
        "from the instruct model"
    )


def rows_left_frozen(model: nn.Module, ids: list[int]) -> list[int]:
    """Of these token ids, the ones whose embedding or lm_head row does not train under the applied scope."""
    frozen: set[int] = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is None:  # a reward model has no lm_head
            continue
        adapter = getattr(module, "token_adapter", None)  # PEFT's trainable tokens: these rows only
        if adapter is not None:
            frozen |= set(ids) - set(adapter.token_indices.get("default", []))
        elif not any(p.requires_grad for p in module.parameters()):
            frozen |= set(ids)
    return sorted(frozen)


def opened_modules(scope: LoraScope, model: nn.Module, decoder: Decoder) -> list[str]:
    """Full module names of the original modules scope.lora.open trains beside the adapter."""
    wanted = {
        "norm": lambda: _final_norm(model, decoder, "scope.lora.open"),
        "lm_head": lambda: module_name(model, model.get_output_embeddings()),
        "embeddings": lambda: module_name(model, model.get_input_embeddings()),
    }
    return sorted({wanted[word]() for word in scope.open})


def module_name(model: nn.Module, module: nn.Module | None) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def fused_experts(scope: LoraScope, model: nn.Module, decoder: Decoder, layers: list[int]) -> tuple[list[str], dict]:
    """The MoE weights PEFT's own all-linear reaches on this model (for targets all-linear and mlp), as full
    parameter names in the chosen layers, and PEFT's rank pattern for them.

    Transformers 5 fuses the experts of Mixtral, Qwen-MoE and others into 3D parameters that are not
    nn.Linear; PEFT's all-linear still targets them (and the router), through target_parameters and a
    larger rank where two projections were fused. Asking PEFT for that resolution keeps the counts PEFT's.
    """
    import copy

    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    if scope.targets not in ("all-linear", "mlp"):
        return [], {}
    probe = LoraConfig(target_modules="all-linear", r=scope.r, lora_alpha=scope.alpha, lora_dropout=0.0)
    convert_peft_config_for_transformers(probe, copy.copy(model), None)
    suffixes = tuple("." + p for p in probe.target_parameters or [])
    if not suffixes:
        return [], {}
    names = [
        n
        for n, _ in model.named_parameters()
        if n.endswith(suffixes)
        and layer_index(n, decoder) in layers
        and (scope.targets == "all-linear" or inside(model, n, MLP_PARENT, decoder))
    ]
    ranks = {k: int(v) for k, v in probe.rank_pattern.items()}
    return names, ranks


# ---------------------------------------------------------------- partial


def _final_norm(model: nn.Module, decoder: Decoder, key: str = "scope.partial.norm") -> str:
    from torch import nn

    base_path = decoder.path.rsplit(".", 1)[0] if "." in decoder.path else ""
    base = model.get_submodule(base_path) if base_path else model
    # The usual names first, then the one normalisation layer beside the decoder blocks, whatever it is called.
    norms = [name for name in FINAL_NORM_NAMES if isinstance(getattr(base, name, None), nn.Module)][:1]
    norms = norms or [name for name, m in base.named_children() if "norm" in type(m).__name__.lower()]
    if len(norms) == 1:
        return f"{base_path}.{norms[0]}" if base_path else norms[0]
    raise ConfigError(
        f"{key}: cannot find the final norm of {type(model).__name__} "
        f"(looked for {', '.join(FINAL_NORM_NAMES)} under '{base_path}')"
        + ("; use scope.partial.patterns instead" if key.startswith("scope.partial") else "")
    )


def partial_parameters(scope: PartialScope, model: nn.Module) -> tuple[list[str], list[int], list[str]]:
    """(parameter names to open, block indices, warnings)."""
    from tunelab.models import score_head

    decoder = find_decoder(model)
    if scope.last_blocks is not None:
        blocks = select_layers(LastN(last=scope.last_blocks), decoder.count, "scope.partial.last_blocks")
    elif scope.blocks is not None:
        blocks = select_layers(scope.blocks, decoder.count, "scope.partial.blocks")
    else:
        blocks = []
    prefixes = tuple(f"{decoder.path}.{i}." for i in blocks)
    if scope.norm:
        prefixes += (_final_norm(model, decoder) + ".",)
    # Select parameter objects, not names: a tied lm_head has no name of its own in named_parameters().
    chosen = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)}
    if scope.lm_head:
        chosen |= {id(p) for p in model.get_output_embeddings().parameters()}
    if scope.embeddings:
        chosen |= {id(p) for p in model.get_input_embeddings().parameters()}
    if (head := score_head(model)) is not None:  # a reward model's new score head starts random: it always trains
        chosen |= {id(p) for p in model.get_submodule(head).parameters()}
    notes = []
    if tied_embeddings(model) and (scope.lm_head != scope.embeddings):
        notes.append(
            "lm_head is tied to the input embeddings (tie_word_embeddings): opening one opens the "
            "other, and both change"
        )
    for pattern in scope.patterns:
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"scope.partial.patterns: '{pattern}' is not a valid regex ({e})") from e
        matched = {id(p) for n, p in model.named_parameters() if regex.search(n)}
        if not matched:
            raise ConfigError(
                f"scope.partial.patterns: '{pattern}' matches no parameter name "
                f"(names look like '{next(iter(dict(model.named_parameters())))}')"
            )
        chosen |= matched
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    return sorted(set(names)), blocks, notes
