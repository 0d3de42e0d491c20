"""Hugging Face PEFT's LoRA adapter layout, written from and read into a MicroLoRA.

PEFT's directory layout (``adapter_model.safetensors`` plus ``adapter_config.json``) is what
PEFT, transformers and vLLM load, so an adapter learned online is usable wherever the base model
is. The two factorisations agree: PEFT's ``lora_A.weight`` is sona's A (rank × in), its
``lora_B.weight`` is B (out × rank), sona's Bᵀ transposed, and both scale by lora_alpha / r.

A MicroLoRA holds one (A, B) per target module, all of one shape and rank. Export replicates
it into every requested decoder layer; import reads one layer, the caller's choice among the
decoder layers the file holds. A PEFT adapter sona cannot represent exactly (DoRA, biases,
per-module ranks or scales, modules of different shapes, extra trained modules in the layer or
outside the decoder layers, such as an lm_head or the embeddings) is refused with the reason,
never approximated; so are tensors for a module the config's target_modules or exclude_modules
leave out, which PEFT would ignore.

Only the tensor dtype float32 is written; float16 and float64 are read (converted to float32,
and a float64 value beyond float32's range is refused rather than turned into inf); bfloat16
cannot be read without torch and is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from sona import container
from sona.errors import ConfigError, FormatError, InvalidInputError
from sona.lora_config import MicroLoraConfig, TargetModule

if TYPE_CHECKING:
    from sona.lora import MicroLoRA

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LLAMA",
    "PeftNaming",
    "export_peft",
    "from_peft",
    "pattern_value",
    "read_config",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PICKLED_WEIGHTS = "adapter_model.bin"
# safetensors metadata an export adds: the adapter's module order (a MicroLoRA config keeps one)
_ORDER_KEY = "sona.target_modules"
_ATTENTION = frozenset(
    {TargetModule.Q_PROJ, TargetModule.K_PROJ, TargetModule.V_PROJ, TargetModule.O_PROJ}
)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_READABLE_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
_LISTED = 10  # tensor names an error lists before it counts the rest
# PeftModel.base_model (the LoraModel) and its .model (the model adapted): the start of every
# name in a PEFT state dict, and not part of the names PEFT's patterns are matched against.
_WRAPPER_PREFIX = "base_model.model."

# Config fields that never change what a loaded adapter computes (bookkeeping, initialisation
# recipes, which modules get wrapped) or that are handled explicitly below.
_HARMLESS = frozenset(
    {
        "alpha_pattern",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",  # only orients the merged weight; lora_A/lora_B are stored as usual
        "inference_mode",
        "init_lora_weights",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_dropout",
        "lora_ga_config",
        "megatron_core",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "task_type",
        "use_rslora",
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class PeftNaming:
    """Where a model family keeps its decoder layers and projections in PEFT's tensor names.

    A tensor is named ``{layers_prefix}.{i}.{attention or mlp}.{module}.lora_{A,B}.weight``.
    The default is the Llama family (Llama, Mistral, Qwen2, Gemma, ...) loaded as a causal LM;
    a bare ``LlamaModel`` has ``layers_prefix="base_model.model.layers"``, OPT has
    ``"base_model.model.model.decoder.layers"``.
    """

    layers_prefix: str = "base_model.model.model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"

    def __post_init__(self) -> None:
        for name in ("layers_prefix", "attention", "mlp"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"naming.{name} must be a str, got {type(value).__name__}")
            if not _DOTTED.fullmatch(value):
                raise ConfigError(f"naming.{name} must be a dotted module path, got {value!r}")

    @property
    def layers_pattern(self) -> str:
        """PEFT's ``layers_pattern``: the name of the module list holding the layers."""
        return self.layers_prefix.rsplit(".", 1)[-1]

    def layer_prefix(self, layer: int) -> str:
        return f"{self.layers_prefix}.{layer}."

    def module_path(self, layer: int, module: TargetModule) -> str:
        block = self.attention if module in _ATTENTION else self.mlp
        return f"{self.layers_prefix}.{layer}.{block}.{module.value}"

    def tensor_name(self, layer: int, module: TargetModule, factor: Literal["A", "B"]) -> str:
        return f"{self.module_path(layer, module)}.lora_{factor}.weight"


LLAMA = PeftNaming()


# ---------------------------------------------------------------------- export
def export_peft(
    lora: MicroLoRA,
    directory: str | os.PathLike[str],
    *,
    layers: Iterable[int] = (0,),
    base_model_name_or_path: str | None = None,
    naming: PeftNaming = LLAMA,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write ``lora`` as a PEFT LoRA adapter applied identically to each of ``layers``.

    The two files cannot be replaced at once, so an export cut short (a crash, a kill) must not
    leave new weights beside the old config, which would read as one adapter with the other's
    rank or scale. The new weights are first written to disk in full; then the old config is
    removed, the weights replaced and the new config written, each atomically. An interrupted
    export leaves the old adapter whole, or a directory without ``adapter_config.json``, which
    :func:`from_peft` refuses. Returns the directory.
    """
    layer_list = _check_layers(layers)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            "base_model_name_or_path must be a str or None, "
            f"got {type(base_model_name_or_path).__name__}"
        )
    if not isinstance(naming, PeftNaming):
        raise TypeError(f"naming must be a PeftNaming, got {type(naming).__name__}")
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type must be a str or None, got {type(task_type).__name__}")
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"directory {target} exists and is not a directory")
    # Both files are checked before either is written: a directory in the place of one, or a
    # file in the place of a parent directory, would otherwise fail half-way with an OSError
    # naming a temporary file.
    weights_path = container.file_target(target / ADAPTER_WEIGHTS)
    config_path = container.file_target(target / ADAPTER_CONFIG)

    tensors: dict[str, np.ndarray] = {}
    for module, a, bt in lora.iter_factors():
        lora_a = np.ascontiguousarray(a, dtype=np.float32)
        lora_b = np.ascontiguousarray(bt.T, dtype=np.float32)
        for layer in layer_list:
            tensors[naming.tensor_name(layer, module, "A")] = lora_a
            tensors[naming.tensor_name(layer, module, "B")] = lora_b
    c = lora.config
    alpha = float(c.alpha)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": c.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(c.dropout),
        "target_modules": [m.value for m in c.target_modules],
        "layers_to_transform": layer_list,
        "layers_pattern": naming.layers_pattern,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    order = ",".join(m.value for m in c.target_modules)
    weights = safetensors.numpy.save(tensors, metadata={"format": "pt", _ORDER_KEY: order})
    container.write_atomic(weights_path, weights, before_replace=config_path)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    container.write_atomic(config_path, text.encode())
    return target


def _check_layers(layers: Iterable[int]) -> list[int]:
    if isinstance(layers, (str, bytes, int)) or not isinstance(layers, Iterable):
        raise TypeError("layers must be a sequence of layer indices, e.g. (0, 1)")
    out: list[int] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layers must hold ints, got {type(layer).__name__}")
        if layer < 0:
            raise InvalidInputError(f"layers must be >= 0, got {int(layer)}")
        out.append(int(layer))
    if not out:
        raise InvalidInputError("layers must name at least one layer")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"layers must be distinct, got {out}")
    return sorted(out)


# ---------------------------------------------------------------------- import
def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT adapter directory."""
    path = Path(directory) / ADAPTER_CONFIG
    if not Path(directory).is_dir():
        raise FormatError(f"{directory}: not a directory (expected a PEFT adapter directory)")
    _check_regular_file(path, "; not a PEFT adapter directory")
    data = container.read_file(path, limit=1 << 20)
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:
        # ValueError also covers bad UTF-8 and integers past Python's digit limit;
        # RecursionError, arrays or objects nested thousands deep.
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def from_peft(
    directory: str | os.PathLike[str],
    *,
    layer: int = 0,
    naming: PeftNaming = LLAMA,
    seed: int | None = None,
    cls: type[MicroLoRA] | None = None,
) -> MicroLoRA:
    """Read layer ``layer`` of a PEFT LoRA adapter directory into a new MicroLoRA (or ``cls``).

    Everything is checked before the adapter is built: the config's options, the presence of
    both factors of every module, their shapes, dtypes and finiteness, and that their delta
    fits float32 (the bound a MicroLoRA's own updates keep).
    """
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if layer < 0:
        raise InvalidInputError(f"layer must be >= 0, got {int(layer)}")
    if not isinstance(naming, PeftNaming):
        raise TypeError(f"naming must be a PeftNaming, got {type(naming).__name__}")
    layer = int(layer)
    root = Path(directory)
    config = read_config(root)
    cfg_path = root / ADAPTER_CONFIG
    _check_options(config, cfg_path)
    rank = _positive_int(config.get("r"), "r", cfg_path)
    alpha = _positive_float(config.get("lora_alpha"), "lora_alpha", cfg_path)
    dropout = config.get("lora_dropout", 0.0)
    if dropout is None:
        dropout = 0.0
    dropout = _number(dropout, "lora_dropout", cfg_path)
    chosen = config.get("layers_to_transform")
    if chosen is not None:
        chosen_list = [chosen] if isinstance(chosen, int) else chosen
        if isinstance(chosen_list, list) and chosen_list and layer not in chosen_list:
            raise FormatError(
                f"{cfg_path}: the adapter covers layers {chosen_list} (layers_to_transform), "
                f"not layer {layer}"
            )

    weights_path = root / ADAPTER_WEIGHTS
    factors, order = _read_layer(weights_path, layer, naming)
    shapes = {m: (a.shape[0], a.shape[1], b.shape[0]) for m, (a, b) in factors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{m.value} (r={r}, in={i}, out={o})" for m, (r, i, o) in shapes.items())
        raise FormatError(
            f"{weights_path}: layer {layer} has modules of different shapes or ranks: {listed}; "
            "a MicroLoRA needs one shape and rank for all its modules (export the modules "
            "separately, or choose a model whose targeted projections share shapes)"
        )
    got_rank, n_in, n_out = next(iter(shapes.values()))
    alphas: dict[TargetModule, float] = {}
    for m in factors:
        path = naming.module_path(layer, m)
        eff_rank = pattern_value(config.get("rank_pattern"), path, rank, where=cfg_path)
        if eff_rank != got_rank:
            raise FormatError(
                f"{weights_path}: {path} has rank {got_rank} but the config gives it r={eff_rank}"
            )
        eff_alpha = pattern_value(config.get("alpha_pattern"), path, alpha, where=cfg_path)
        alphas[m] = _positive_float(eff_alpha, f"alpha_pattern's lora_alpha for {path}", cfg_path)
    if len(set(alphas.values())) > 1:
        listed = ", ".join(f"{m.value} {a:g}" for m, a in alphas.items())
        raise FormatError(
            f"{cfg_path}: alpha_pattern gives the modules of layer {layer} different "
            f"lora_alpha ({listed}); a MicroLoRA has one scale for all its modules"
        )
    # The layer's one alpha, which alpha_pattern may set for all its modules alike.
    alpha = next(iter(alphas.values()))
    paths = {m: naming.module_path(layer, m) for m in factors}
    _check_targets(config.get("target_modules"), paths, cfg_path)
    _check_excluded(config.get("exclude_modules"), paths, cfg_path)
    if config.get("use_rslora", False):
        # rsLoRA scales by alpha / sqrt(r); sona by alpha / r, so the same scale needs
        # alpha·sqrt(r).
        alpha = alpha * math.sqrt(got_rank)
    modules = _listed_order(order, factors)
    try:
        micro = MicroLoraConfig(
            in_features=n_in,
            out_features=n_out,
            rank=got_rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=modules,
        )
    except (ConfigError, TypeError) as exc:
        raise FormatError(f"{root}: the adapter does not fit a MicroLoRA: {exc}") from None
    from sona.lora import MicroLoRA, check_delta_fits

    for m, (a, b) in factors.items():
        names = f"{naming.tensor_name(layer, m, 'A')} and {naming.tensor_name(layer, m, 'B')}"
        check_delta_fits(micro.scaling, a, b, f"{weights_path}: {names} (scale {micro.scaling:g})")
    if cls is None:
        cls = MicroLoRA
    lora = cls(micro, seed=seed)
    for m, (a, b) in factors.items():
        lora.set_factors(m, a, np.ascontiguousarray(b.T))
    return lora


def pattern_value(
    patterns: object, module_path: str, default: Any, *, where: Path | None = None
) -> Any:
    """The value PEFT's ``rank_pattern``/``alpha_pattern`` assigns to ``module_path``.

    PEFT takes the first key that matches the end of the module's name at a dot boundary. It
    matches names inside the base model (``model.layers.0.self_attn.q_proj``), not the saved
    tensor's path, which PEFT's wrappers prefix with ``base_model.model.``: a key anchored with
    ``^``, as PEFT's documentation shows them, matches only once that prefix is removed.
    """
    if not patterns:
        return default
    at = "" if where is None else f"{where}: "
    if not isinstance(patterns, Mapping):
        raise FormatError(f"{at}rank_pattern/alpha_pattern must be an object, got {patterns!r}")
    name = module_path.removeprefix(_WRAPPER_PREFIX)
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as exc:
            raise FormatError(f"{at}invalid pattern {key!r}: {exc}") from None
    return default


def _listed_order(listed: list[str], found: Iterable[TargetModule]) -> tuple[TargetModule, ...]:
    """``found`` in the order :func:`export_peft` recorded (the adapter's own), so that an
    exported adapter reads back with an equal config; else in the enum's order (PEFT keeps
    ``target_modules`` as a set, and saves it in no fixed order)."""
    by_value = {m.value: m for m in found}
    if sorted(listed) == sorted(by_value):
        return tuple(by_value[v] for v in listed)
    return tuple(m for m in TargetModule if m.value in by_value)


def _check_options(config: Mapping[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise FormatError(f"{where}: peft_type is {peft_type!r}; only LORA adapters are read")
    bias = config.get("bias", "none")
    if bias != "none":
        raise FormatError(
            f"{where}: bias={bias!r} trains bias vectors a MicroLoRA cannot hold; "
            "only bias='none' is supported"
        )
    refused = {
        key: value
        for key, value in config.items()
        if key not in _HARMLESS and value not in (None, False, "", [], {})
    }
    if refused:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(refused.items()))
        raise FormatError(
            f"{where}: unsupported options {listed}: they change what the adapter computes "
            "and a MicroLoRA cannot represent them"
        )


def _check_targets(targets: object, paths: Mapping[TargetModule, str], where: Path) -> None:
    """Every listed module must be a projection a MicroLoRA adapts, and every module with
    tensors must be listed.

    PEFT wraps and trains a listed ``lm_head`` or ``embed_tokens`` too, so an adapter listing
    one holds something sona cannot represent, even where those tensors were not kept. Tensors
    for a module the config does not list would be ignored by PEFT: a mismatch.

    PEFT matches each listed name against the end of a module's name inside the base model at
    a dot boundary, and a string (other than "all-linear") as a regex against the whole name.
    """
    names = {m: path.removeprefix(_WRAPPER_PREFIX) for m, path in paths.items()}
    if targets is None or targets == "all-linear":
        return  # PEFT's defaults or every linear layer: PEFT resolves them against the model
    if isinstance(targets, str):
        try:
            unmatched = [m.value for m, name in names.items() if not re.fullmatch(targets, name)]
        except re.error as exc:
            raise FormatError(
                f"{where}: target_modules {targets!r} is not a regex: {exc}"
            ) from None
        if unmatched:
            raise FormatError(
                f"{where}: tensors exist for {unmatched}, which the target_modules regex "
                f"{targets!r} does not match (PEFT would leave them out)"
            )
        return
    if not isinstance(targets, list):
        raise FormatError(
            f"{where}: target_modules must be a list of module names, a string or null, "
            f"got {targets!r}"
        )
    projections = {m.value for m in TargetModule}
    foreign = [
        t for t in targets if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in projections
    ]
    if foreign:
        raise FormatError(
            f"{where}: target_modules lists {foreign}, which a MicroLoRA cannot represent "
            f"(it adapts only {', '.join(m.value for m in TargetModule)})"
        )
    listed = [str(t) for t in targets]
    stray = [
        m.value
        for m, name in names.items()
        if not any(name == t or name.endswith(f".{t}") for t in listed)
    ]
    if stray:
        raise FormatError(
            f"{where}: tensors exist for {stray}, which target_modules {targets} does not list"
        )


def _check_excluded(excluded: object, paths: Mapping[TargetModule, str], where: Path) -> None:
    """No module with tensors may be one ``exclude_modules`` excludes.

    PEFT never wraps an excluded module, so it ignores tensors saved for one: loading them
    would give an adapter PEFT does not compute. Such tensors contradict the config, as
    tensors for a module target_modules does not list do, and are refused the same way. PEFT
    matches a string as a regex against the whole name inside the base model, and each name
    of a list against its end at a dot boundary.
    """
    if excluded is None or excluded == []:
        return
    names = {m: path.removeprefix(_WRAPPER_PREFIX) for m, path in paths.items()}
    if isinstance(excluded, str):
        try:
            hit = [m.value for m, name in names.items() if re.fullmatch(excluded, name)]
        except re.error as exc:
            raise FormatError(
                f"{where}: exclude_modules {excluded!r} is not a regex: {exc}"
            ) from None
    elif isinstance(excluded, list) and all(isinstance(e, str) for e in excluded):
        hit = [
            m.value
            for m, name in names.items()
            if any(name == e or name.endswith(f".{e}") for e in excluded)
        ]
    else:
        raise FormatError(
            f"{where}: exclude_modules must be a list of module names, a string or null, "
            f"got {excluded!r}"
        )
    if hit:
        raise FormatError(
            f"{where}: tensors exist for {hit}, which exclude_modules {excluded!r} excludes "
            "(PEFT would leave them out)"
        )


def _read_layer(
    path: Path, layer: int, naming: PeftNaming
) -> tuple[dict[TargetModule, tuple[np.ndarray, np.ndarray]], list[str]]:
    """The layer's factors by module, and the module order an export by sona recorded."""
    hint = ""
    if (path.parent / _PICKLED_WEIGHTS).is_file():
        hint = (
            f" ({_PICKLED_WEIGHTS} is a torch.save file, which can run code when loaded, so "
            "sona never reads it; re-save it with "
            "save_pretrained(..., safe_serialization=True))"
        )
    _check_regular_file(path, hint)
    try:
        with safe_open(str(path), framework="numpy") as fh:
            listed = str((fh.metadata() or {}).get(_ORDER_KEY, "")).split(",")
            keys = list(fh.keys())
            wanted = _layer_keys(path, keys, layer, naming)
            factors: dict[TargetModule, tuple[np.ndarray, np.ndarray]] = {}
            for module, (key_a, key_b) in wanted.items():
                a = _tensor(fh, key_a, path)
                b = _tensor(fh, key_b, path)
                if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                    raise FormatError(
                        f"{path}: {key_a} has shape {a.shape} and {key_b} {b.shape}; expected "
                        "(r, in) and (out, r) with the same r"
                    )
                factors[module] = (a, b)
    except SafetensorError as exc:
        raise FormatError(f"{path}: not a valid safetensors file: {exc}") from None
    return factors, listed


def _check_regular_file(path: Path, when_missing: str) -> None:
    """Refuse anything at ``path`` but a regular file (symlinks followed), saying what is there.

    A directory, FIFO or broken symlink is not "missing": the message says which it is, so the
    fix is evident. A FIFO must be refused before it is opened, which would wait for a writer.
    """
    if path.is_file():
        return
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, expected a file")
    if path.exists():
        raise FormatError(f"{path}: not a regular file (a FIFO, socket or device), expected a file")
    if path.is_symlink():
        raise FormatError(f"{path}: a symbolic link that leads to no file")
    raise FormatError(f"{path}: missing{when_missing}")


def _layer_keys(
    path: Path, keys: list[str], layer: int, naming: PeftNaming
) -> dict[TargetModule, tuple[str, str]]:
    prefix = naming.layer_prefix(layer)
    in_layer = {k for k in keys if k.startswith(prefix)}
    if not in_layer:
        layers = sorted(
            {
                int(m.group(1))
                for k in keys
                if (m := re.match(re.escape(naming.layers_prefix) + r"\.(\d+)\.", k))
            }
        )
        if layers:
            raise FormatError(f"{path}: no tensors for layer {layer}; it holds layers {layers}")
        example = keys[0] if keys else "none"
        raise FormatError(
            f"{path}: no tensor name starts with {naming.layers_prefix!r} (first tensor: "
            f"{example}); pass a PeftNaming that matches the model family"
        )
    # Other decoder layers are the choice ``layer`` makes; anything outside the decoder layers
    # (an lm_head or embedding adapter, a stray tensor) is trained state no layer represents.
    layer_key = re.compile(re.escape(naming.layers_prefix) + r"\.(0|[1-9][0-9]*)\.")
    outside = sorted(k for k in keys if not layer_key.match(k))
    if outside:
        listed = ", ".join(outside[:_LISTED])
        more = f" and {len(outside) - _LISTED} more" if len(outside) > _LISTED else ""
        raise FormatError(
            f"{path}: tensors outside the decoder layers ({naming.layers_prefix}.N), which a "
            f"MicroLoRA cannot represent: {listed}{more}"
        )
    wanted: dict[TargetModule, tuple[str, str]] = {}
    for module in TargetModule:
        key_a = naming.tensor_name(layer, module, "A")
        key_b = naming.tensor_name(layer, module, "B")
        if key_a in in_layer or key_b in in_layer:
            missing = [k for k in (key_a, key_b) if k not in in_layer]
            if missing:
                raise FormatError(f"{path}: missing tensor {missing[0]}")
            wanted[module] = (key_a, key_b)
            in_layer -= {key_a, key_b}
    if in_layer:
        raise FormatError(
            f"{path}: tensors sona cannot represent in layer {layer}: {sorted(in_layer)}"
        )
    return wanted


def _tensor(fh: Any, key: str, path: Path) -> np.ndarray:
    dtype = fh.get_slice(key).get_dtype()
    try:
        arr = np.asarray(fh.get_tensor(key))
    except TypeError:
        raise FormatError(
            f"{path}: tensor {key} has dtype {dtype}, which numpy cannot read; "
            "save the adapter in float32 or float16"
        ) from None
    if arr.dtype not in _READABLE_DTYPES:
        raise FormatError(f"{path}: tensor {key} has dtype {dtype}; expected a float dtype")
    if not np.isfinite(arr).all():
        raise FormatError(f"{path}: tensor {key} holds NaN or inf")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():  # finite float64 beyond float32's range
        largest = float(np.max(np.abs(arr)))
        raise FormatError(
            f"{path}: tensor {key} holds {largest:.4g}, beyond float32's range "
            f"(max {float(np.finfo(np.float32).max):.4g}); sona's factors are float32"
        )
    return out


def _number(value: object, name: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where}: {name} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # a JSON integer beyond float's range
        raise FormatError(
            f"{where}: {name} must be finite, got an integer of {len(str(value))} digits"
        ) from None
    if not math.isfinite(v):
        raise FormatError(f"{where}: {name} must be finite, got {value!r}")
    return v


def _positive_float(value: object, name: str, where: Path) -> float:
    v = _number(value, name, where)
    if v <= 0:
        raise FormatError(f"{where}: {name} must be > 0, got {value!r}")
    return v


def _positive_int(value: object, name: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FormatError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value
