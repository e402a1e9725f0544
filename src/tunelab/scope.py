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
MLP_PARENT = re.compile(r"mlp|feed_forward|ffn", re.IGNORECASE)
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


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
    root = text_root(model)
    if not root:
        return []
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
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


def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


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


def _attention_or_mlp(linears: list[str], parent: re.Pattern) -> list[str]:
    return sorted({leaf(n) for n in linears if any(parent.search(p) for p in n.split(".")[:-1])})


def expand_targets(targets: str | list[str], linears: list[str], arch: str) -> tuple[list[str], str | None]:
    """(module-name suffixes, or None) and (a regex, or None) for PEFT's target_modules."""
    available = sorted({leaf(n) for n in linears})
    listing = f"linear modules in {arch}: {', '.join(available)}"
    if isinstance(targets, list):
        names = targets
    elif targets in PRESET_NAMES:
        names = PRESET_NAMES[targets]
    elif targets == "all-linear":
        return available, None
    elif targets in ("attention", "mlp"):
        names = _attention_or_mlp(linears, ATTENTION_PARENT if targets == "attention" else MLP_PARENT)
        if not names:
            raise ConfigError(f"scope.lora.targets: preset '{targets}' matches nothing; {listing}")
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
    missing = [n for n in names if not any(n == leaf(m) or m.endswith("." + n) for m in linears)]
    if missing:
        what = f"preset '{targets}' ({', '.join(names)})" if isinstance(targets, str) else "targets"
        raise ConfigError(f"scope.lora.targets: {what}: {', '.join(missing)} not found; {listing}")
    return sorted(names), None


def lora_config(
    scope: LoraScope, model: nn.Module, token_ids: list[int] | None = None
) -> tuple[LoraConfig, Decoder, list[int]]:
    """An explicit PEFT LoraConfig: presets expanded into module names, layers into indices; `token_ids`: the ids of
    scope.tokens (see `token_ids`)."""
    from peft import LoraConfig

    decoder = find_decoder(model, scope.layers_pattern)
    layers = select_layers(scope.layers, decoder.count, "scope.lora.layers")
    linears = linear_modules(model)
    towers = bool(other_towers(model))
    if towers:  # an image-text checkpoint: only the language model's linear layers, never the vision encoder's
        linears = [n for n in linears if layer_index(n, decoder) is not None]
    names, regex = expand_targets(scope.targets, linears, type(model).__name__)
    all_layers = layers == list(range(decoder.count))
    if towers or (regex is not None and not all_layers):
        # PEFT cannot combine a regex with layers_to_transform, and a module name alone would also match the
        # vision encoder's q_proj: fold the choice into full module names.
        names = [
            n
            for n in linears
            if (re.fullmatch(regex, n) if regex is not None else any(n == t or n.endswith("." + t) for t in names))
            and layer_index(n, decoder) in layers
        ]
        regex = None
    params, patterns = _fused_experts(scope, model, decoder, layers) if scope.targets == "all-linear" else ([], {})
    if params and scope.dora:
        raise ConfigError(
            f"scope.lora.dora: all-linear on {type(model).__name__} reaches its fused expert weights, which PEFT "
            "cannot train with DoRA; set targets: attention (or a list of module names) to leave the experts out, "
            "or dora: false"
        )
    dropout = scope.dropout
    if params and dropout:
        if "dropout" in scope.model_fields_set:
            raise ConfigError(
                f"scope.lora.dropout: all-linear on {type(model).__name__} reaches its fused expert weights "
                f"({', '.join(sorted({n.split('.', 3)[-1] for n in params})[:3])}, ...), which PEFT trains only "
                "without dropout; set scope.lora.dropout: 0, or targets: attention to leave the experts out"
            )
        dropout = 0.0  # the default gives way where PEFT cannot apply it; Lora.apply says so
    config = LoraConfig(
        r=scope.r,
        lora_alpha=scope.alpha,
        lora_dropout=dropout,
        bias=scope.bias,
        task_type=scope.task_type,
        target_modules=regex if regex is not None else names,
        layers_to_transform=None if all_layers or regex is not None else layers,
        layers_pattern=None if all_layers or regex is not None else decoder.pattern,
        target_parameters=params or None,
        rank_pattern=patterns,
        alpha_pattern=patterns and {k: v * scope.alpha / scope.r for k, v in patterns.items()},
        use_dora=scope.dora,
        use_rslora=scope.rslora,
        modules_to_save=opened_modules(scope, model, decoder) or None,
        trainable_token_indices=token_rows(model, token_ids) if token_ids else None,
        # A tied lm_head and embedding matrix stay one tensor when either opens: trained apart, the merged model
        # would be saved tied again and lose one of them. (PEFT ties trainable token rows on its own.)
        ensure_weight_tying=bool(scope.open) and tied_embeddings(model),
    )
    return config, decoder, layers


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
    if not tied_embeddings(model):
        rows[module_name(model, model.get_output_embeddings())] = ids
    return rows


def untrained_tokens(model: nn.Module, ids: set[int], read_rows=None) -> list[int]:
    """Of these token ids, the ones the base never trained: an embedding (or untied lm_head) row near zero beside the
    typical row, as a base model's chat-template tokens are (Llama 3's <|eot_id|> in the base checkpoint).
    `read_rows(parameter_name, rows)`: where the weights are not loaded (plan), the checkpoint's rows by name, or
    None where it has no such tensor."""
    modules = [model.get_input_embeddings()]
    if not tied_embeddings(model):
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


def _fused_experts(scope: LoraScope, model: nn.Module, decoder: Decoder, layers: list[int]) -> tuple[list[str], dict]:
    """The MoE weights PEFT's own all-linear reaches on this model, as full parameter names in the chosen layers.

    Transformers 5 fuses the experts of Mixtral, Qwen-MoE and others into 3D parameters that are not
    nn.Linear; PEFT's all-linear still targets them (and the router), through target_parameters and a
    larger rank where two projections were fused. Asking PEFT for that resolution keeps the counts PEFT's.
    """
    import copy

    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    probe = LoraConfig(target_modules="all-linear", r=scope.r, lora_alpha=scope.alpha, lora_dropout=0.0)
    convert_peft_config_for_transformers(probe, copy.copy(model), None)
    suffixes = tuple("." + p for p in probe.target_parameters or [])
    if not suffixes:
        return [], {}
    names = [n for n, _ in model.named_parameters() if n.endswith(suffixes) and layer_index(n, decoder) in layers]
    ranks = {k: int(v) for k, v in probe.rank_pattern.items()}
    return names, ranks


# ---------------------------------------------------------------- partial


def _final_norm(model: nn.Module, decoder: Decoder, key: str = "scope.partial.norm") -> str:
    base_path = decoder.path.rsplit(".", 1)[0] if "." in decoder.path else ""
    base = model.get_submodule(base_path) if base_path else model
    for name in FINAL_NORM_NAMES:
        if hasattr(base, name):
            return f"{base_path}.{name}" if base_path else name
    raise ConfigError(
        f"{key}: cannot find the final norm of {type(model).__name__} "
        f"(looked for {', '.join(FINAL_NORM_NAMES)} under '{base_path}')"
        + ("; use scope.partial.patterns instead" if key.startswith("scope.partial") else "")
    )


def partial_parameters(scope: PartialScope, model: nn.Module) -> tuple[list[str], list[int], list[str]]:
    """(parameter names to open, block indices, warnings)."""
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
