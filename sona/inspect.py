"""``sona inspect PATH``: what an adapter, a checkpoint or a PEFT adapter directory holds.

Each kind of input has an :class:`Inspector` that recognises it cheaply (a magic number, a
file name) and describes it as a :class:`Report`. New kinds, such as checkpoints, plug in with
:func:`register` without touching the others. Describing never changes the input.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np
from safetensors import SafetensorError, safe_open

from sona import container
from sona.errors import FormatError
from sona.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, pattern_value, read_config

__all__ = [
    "CheckpointInspector",
    "Inspector",
    "PeftAdapterInspector",
    "Report",
    "SonaAdapterInspector",
    "describe",
    "inspectors",
    "register",
    "run",
]

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
_LAYER_INDEX = re.compile(r"^(?P<head>.*?\.)(?P<index>\d+)(?P<tail>\..*)$")


@dataclass(frozen=True)
class Report:
    """A description of one input: summary fields, then a table with one row per module."""

    kind: str
    path: Path
    fields: list[tuple[str, str]]
    columns: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"{self.kind}: {self.path}"]
        width = max((len(k) for k, _ in self.fields), default=0)
        lines += [f"  {k.ljust(width)}  {v}" for k, v in self.fields]
        if self.columns:
            table = [self.columns, *self.rows]
            widths = [max(len(r[i]) for r in table) for i in range(len(self.columns))]
            lines.append("")
            for r in table:
                cells = [
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ]
                lines.append("  " + "  ".join(cells).rstrip())
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class Inspector(Protocol):
    """One kind of input ``sona inspect`` understands."""

    name: str

    def recognises(self, path: Path) -> bool:
        """Cheap check (magic number, file name) that ``path`` is this kind; never raises."""
        ...

    def describe(self, path: Path) -> Report:
        """Full description; raises :class:`FormatError` when the input is corrupt."""
        ...


_REGISTRY: list[Inspector] = []


def register(inspector: Inspector, *, first: bool = False) -> None:
    """Add a kind of input; ``first`` lets a more specific kind win over existing ones."""
    if not callable(getattr(inspector, "recognises", None)) or not callable(
        getattr(inspector, "describe", None)
    ):
        raise TypeError("inspector must provide recognises(path) and describe(path)")
    if first:
        _REGISTRY.insert(0, inspector)
    else:
        _REGISTRY.append(inspector)


def inspectors() -> tuple[Inspector, ...]:
    return tuple(_REGISTRY)


def describe(path: str | Path) -> Report:
    """The report of the first registered inspector that recognises ``path``."""
    if isinstance(path, str) and not path:  # Path("") is ".", the current directory
        raise FormatError("an empty path names no file or directory")
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if not (p.is_file() or p.is_dir()):  # reading a FIFO would wait for a writer forever
        raise FormatError(f"{p}: not a regular file or directory (a FIFO, socket or device)")
    for inspector in _REGISTRY:
        if inspector.recognises(p):
            return inspector.describe(p)
    kinds = ", ".join(i.name for i in _REGISTRY)
    raise FormatError(f"{p}: not a recognised input (sona inspect reads: {kinds})")


def run(path: str, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The CLI entry point: 0 after printing a report, 2 with a message for bad input."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        report = describe(path)
    except (ValueError, TypeError, OSError, OverflowError) as exc:
        print(f"sona inspect: error: {exc}", file=err)
        return 2
    print(report.render(), file=out)
    return 0


# ---------------------------------------------------------------------- sona adapters
class SonaAdapterInspector:
    """Files written by ``MicroLoRA.save``."""

    name = "sona adapter (MicroLoRA.save)"

    def recognises(self, path: Path) -> bool:
        from sona.lora import _MAGIC

        return _starts_with(path, _MAGIC)

    def describe(self, path: Path) -> Report:
        from sona.lora import MicroLoRA

        lora = MicroLoRA.load(path)
        c = lora.config
        fields = [
            ("modules", ", ".join(m.value for m in c.target_modules)),
            ("in_features", str(c.in_features)),
            ("out_features", str(c.out_features)),
            ("rank", str(c.rank)),
            ("alpha", _num(c.alpha)),
            ("scaling", f"{_num(lora.scaling)} (alpha / rank)"),
            ("dropout", _num(c.dropout)),
            ("parameters", str(lora.param_count)),
            ("version", str(lora.version)),
        ]
        rows: list[tuple[str, ...]] = []
        for module, a, bt in lora.iter_factors():
            rows.append(
                (
                    module.value,
                    str(c.rank),
                    str(c.in_features),
                    str(c.out_features),
                    _num(lora.scaling),
                    f"{_delta_norm(a, bt, lora.scaling):.4g}",
                )
            )
        columns = ("module", "rank", "in", "out", "scale", "|ΔW|")
        return Report("sona adapter", path, fields, columns, rows)


def _delta_norm(a: np.ndarray, bt: np.ndarray, scale: float) -> float:
    """‖s·Bᵀ·A‖_F from two rank × rank Gram matrices, without forming the out × in matrix."""
    a64 = a.astype(np.float64)
    b64 = bt.astype(np.float64)
    sq = float(np.sum((b64 @ b64.T) * (a64 @ a64.T)))
    return abs(scale) * math.sqrt(max(sq, 0.0))


# ---------------------------------------------------------------------- PEFT directories
class PeftAdapterInspector:
    """Hugging Face PEFT adapter directories (or the config/weights file inside one)."""

    name = "PEFT adapter directory"

    def recognises(self, path: Path) -> bool:
        root = _peft_root(path)
        return root is not None and (root / ADAPTER_CONFIG).is_file()

    def describe(self, path: Path) -> Report:
        root = _peft_root(path)
        assert root is not None
        config = read_config(root)
        weights = root / ADAPTER_WEIGHTS
        shapes, dtypes = _tensor_shapes(weights)
        others: list[str] = []
        peft_type = config.get("peft_type")
        r = config.get("r")
        alpha = config.get("lora_alpha")
        rslora = bool(config.get("use_rslora", False))
        modules: dict[str, dict[str, list[int]]] = defaultdict(dict)
        for key, shape in shapes.items():
            m = _LORA_KEY.match(key)
            if m is None or len(shape) < 2:
                others.append(key)
            else:
                modules[m.group("module")][m.group("factor")] = shape
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        params = 0
        notes: list[str] = []
        cfg = root / ADAPTER_CONFIG
        for module, factors in sorted(modules.items()):
            if set(factors) != {"A", "B"}:
                missing = "B" if "A" in factors else "A"
                notes.append(f"{module}: lora_{missing}.weight is missing")
                continue
            a, b = factors["A"], factors["B"]
            rank, n_in, n_out = a[0], a[1], b[0]
            params += math.prod(a) + math.prod(b)
            if b[-1] != rank:
                notes.append(f"{module}: lora_A has rank {rank}, lora_B has rank {b[-1]}")
            eff_r = pattern_value(config.get("rank_pattern"), module, r, where=cfg)
            eff_alpha = pattern_value(config.get("alpha_pattern"), module, alpha, where=cfg)
            if eff_r != rank:
                notes.append(f"{module}: tensors have rank {rank}, the config says {eff_r}")
            scale = _peft_scale(eff_alpha, rank, rslora)
            name, layer = _generalise(module)
            groups[(name, str(rank), str(n_in), str(n_out), scale)].append(layer)
        rows = [(key[0], _ranges(layers), *key[1:]) for key, layers in sorted(groups.items())]
        layer_set = sorted({i for layers in groups.values() for i in layers if i >= 0})
        fields = [
            ("peft_type", str(peft_type)),
            ("task_type", str(config.get("task_type"))),
            ("base model", str(config.get("base_model_name_or_path"))),
            ("r", str(r)),
            ("lora_alpha", str(alpha)),
            ("scale", f"{_peft_scale(alpha, r, rslora)} ({_scale_rule(rslora)})"),
            ("lora_dropout", str(config.get("lora_dropout"))),
            ("target_modules", _listing(config.get("target_modules"))),
            ("layers", _ranges(layer_set) if layer_set else "-"),
            ("bias", str(config.get("bias", "none"))),
            ("use_dora", str(bool(config.get("use_dora", False)))),
            ("use_rslora", str(rslora)),
            ("tensors", f"{len(shapes)} ({', '.join(sorted(dtypes))})"),
            ("parameters", str(params)),
            ("sona from_peft", _sona_readability(root, layer_set)),
        ]
        for pattern in ("rank_pattern", "alpha_pattern"):
            if config.get(pattern):
                fields.append((pattern, str(config[pattern])))
        if others:
            shown = ", ".join(sorted(others)[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            notes.append(f"{len(others)} non-LoRA-factor tensors: {shown}{more}")
        columns = ("module", "layers", "rank", "in", "out", "scale")
        return Report("PEFT LoRA adapter", root, fields, columns, rows, notes)


def _peft_root(path: Path) -> Path | None:
    if path.is_dir():
        return path
    if path.is_file() and path.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        return path.parent
    return None


def _tensor_shapes(path: Path) -> tuple[dict[str, list[int]], set[str]]:
    """Names, shapes and dtypes from the safetensors header, without reading any tensor."""
    if not path.is_file():
        raise FormatError(f"{path}: missing")
    shapes: dict[str, list[int]] = {}
    dtypes: set[str] = set()
    try:
        with safe_open(str(path), framework="numpy") as fh:
            names = fh.keys()
            for key in names:
                sl = fh.get_slice(key)
                shapes[key] = list(sl.get_shape())
                dtypes.add(str(sl.get_dtype()))
    except SafetensorError as exc:
        raise FormatError(f"{path}: not a valid safetensors file: {exc}") from None
    return shapes, dtypes


def _sona_readability(root: Path, layers: Sequence[int]) -> str:
    from sona.peft_format import from_peft

    if not layers:
        return "no (no layered LoRA tensors)"
    try:
        lora = from_peft(root, layer=layers[0])
    except (ValueError, TypeError) as exc:
        return f"no: {exc}"
    c = lora.config
    return (
        f"yes (layer {layers[0]}: in={c.in_features}, out={c.out_features}, rank={c.rank}, "
        f"scaling={_num(lora.scaling)})"
    )


def _generalise(module: str) -> tuple[str, int]:
    """``...layers.3.self_attn.q_proj`` -> (``...layers.*.self_attn.q_proj``, 3)."""
    m = _LAYER_INDEX.match(module)
    if m is None:
        return module, -1
    return f"{m.group('head')}*{m.group('tail')}", int(m.group("index"))


def _peft_scale(alpha: Any, rank: Any, rslora: bool) -> str:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        return "?"
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        return "?"
    try:
        return _num(alpha / math.sqrt(rank) if rslora else alpha / rank)
    except OverflowError:  # JSON integers beyond float's range
        return "?"


def _scale_rule(rslora: bool) -> str:
    return "lora_alpha / sqrt(r), rsLoRA" if rslora else "lora_alpha / r"


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"; a module outside any numbered layer shows as "-"."""
    items = sorted(set(values))
    if not items or items == [-1]:
        return "-"
    parts: list[str] = []
    start = prev = items[0]
    for v in [*items[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append("-" if start < 0 else str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _listing(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _num(value: float) -> str:
    return f"{value:.6g}"


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with container.open_file(path) as fh:
            return fh.read(len(magic)) == magic
    except (OSError, FormatError):
        return False


# ---------------------------------------------------------------------- checkpoints
class CheckpointInspector:
    """Files written by ``SonaRuntime.checkpoint`` and ``checkpoint_dir`` directories."""

    name = "sona checkpoint (SonaRuntime.checkpoint) or checkpoint_dir"

    def recognises(self, path: Path) -> bool:
        from sona.checkpoint import MAGIC
        from sona.checkpoint_store import list_checkpoints
        from sona.sample_log import LOG_FILE

        if path.is_dir():
            try:
                return bool(list_checkpoints(path)) or (path / LOG_FILE).is_file()
            except OSError:
                return False
        return _starts_with(path, MAGIC)

    def describe(self, path: Path) -> Report:
        from sona.checkpoint import read
        from sona.checkpoint_store import list_checkpoints, newest_valid

        notes: list[str] = []
        if path.is_dir():
            state, skipped = newest_valid(path)
            notes += [f"unreadable, passed over: {reason}" for reason in skipped]
            kind = "sona checkpoint_dir"
            files = [p.name for _, p in list_checkpoints(path)]
            head = [("checkpoints", ", ".join(files)), ("newest readable", Path(state.path).name)]
            head.append(("sample log", _log_status(path, state.log_sequence)))
        else:
            state = read(path)
            kind = "sona checkpoint"
            head = []
        cfg = state.config
        micro = cfg.micro_lora
        c = state.counters
        inst = state.instant
        bgm = state.background
        created = _dt.datetime.fromtimestamp(state.created_unix, _dt.UTC)
        samples = state.samples
        fields = [
            *head,
            ("format", "sona.checkpoint/1"),
            ("written", created.isoformat(timespec="seconds")),
            ("run", state.run_id),
            ("checkpoint number", str(state.checkpoint_seq)),
            ("seed", str(state.seed)),
            ("log sequence", f"{state.log_sequence} (samples up to this id are included)"),
            ("next sample id", str(state.next_sample_id)),
            (
                "adapter",
                f"in={micro.in_features} out={micro.out_features} rank={micro.rank} "
                f"modules={','.join(m.value for m in micro.target_modules)}",
            ),
            ("strategy", cfg.consolidation_strategy.value),
            (
                "samples",
                f"submitted {c.submitted}, applied {inst.applied}, skipped {inst.skipped}, "
                f"dropped {c.dropped}, dead-lettered {c.dead_lettered}",
            ),
            (
                "waiting",
                f"queued {len(samples['queued'])}, pending {len(samples['pending'])}, "
                f"held back {len(samples['carry'])}, interrupted hand-over "
                f"{len(samples['unfinished'])}",
            ),
            ("replay buffer", f"{len(samples['replay'])} of {cfg.replay_capacity}"),
            ("consolidations", f"{bgm.runs} ({bgm.consolidated} samples), version {bgm.version}"),
            ("deep runs", str(c.deep_runs)),
            ("tasks", str(state.pipeline.task_count)),
            ("pattern clusters", f"{len(state.bank)} of {cfg.pattern_clusters}"),
        ]
        rows: list[tuple[str, ...]] = []
        adapters = [("live", state.live), ("consolidated", state.base)]
        adapters += [(f"cluster {k}", a) for k, a in sorted(state.ensemble.items())]
        if state.unfinished is not None:
            adapters.append(("interrupted hand-over", state.unfinished.live))
        for name, lora in adapters:
            lc = lora.config
            for module, a, bt in lora.iter_factors():
                rows.append(
                    (
                        name,
                        module.value,
                        str(lc.rank),
                        str(lc.in_features),
                        str(lc.out_features),
                        f"{_delta_norm(a, bt, lora.scaling):.4g}",
                    )
                )
        columns = ("adapter", "module", "rank", "in", "out", "|ΔW|")
        return Report(kind, path, fields, columns, rows, notes)


def _log_status(directory: Path, log_sequence: int) -> str:
    from sona.sample_log import LOG_FILE, log_summary

    log = directory / LOG_FILE
    if not log.exists():
        # every checkpoint in a checkpoint_dir is written with its log beside it
        return "missing (a restore refuses the directory without it)"
    try:
        rows, first, last, above = log_summary(log, log_sequence)
    except FormatError as exc:
        return f"unreadable: {exc}"
    if rows == 0:
        return "empty"
    return f"{rows} samples, ids {first}..{last}; {above} after the checkpoint, to replay"


register(CheckpointInspector())
register(SonaAdapterInspector())
register(PeftAdapterInspector())
