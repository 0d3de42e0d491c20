"""The EWC++ training pipeline: one update per sample, without forgetting earlier tasks.

A step gates the feedback (``quality_threshold``), accumulates and applies the adapter's
gradient (clipped to ``max_grad_norm``), then takes a proximal EWC++ step that pulls ΔW back
toward its anchor on the input directions earlier tasks used (:mod:`sona.ewc`). Task boundaries
come from :meth:`TrainingPipeline.start_new_task` or, with ``boundary_detection``, from a
sustained shift of the input statistics (:mod:`sona.boundary`); either folds the importance of
the task that ended and re-anchors.

The Background loop owns a pipeline; its whole state is exportable as JSON-able metadata plus
named arrays (:meth:`TrainingPipeline.state_dict`) for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sona.boundary import ShiftDetector
from sona.errors import ConfigMismatchError, FormatError, InvalidInputError
from sona.ewc import EwcImportance, InputWindow
from sona.feedback import AdaptFeedback, FeedbackKind
from sona.kernels import update as k_update
from sona.kernels.replay import EwcArrays
from sona.log import get_logger
from sona.lora import MicroLoRA
from sona.lora_config import TargetModule
from sona.row_scan import Projected
from sona.sample import TrainingSample
from sona.training_config import TrainingConfig
from sona.validation import MAX_COUNT, as_f32

__all__ = [
    "StepResult",
    "TrainingConfig",
    "TrainingPipeline",
    "TrainingSample",
]

_log = get_logger("sona.training")
_STATE_FORMAT = "sona.training/1"
_GATED = (FeedbackKind.TARGET, FeedbackKind.GRADIENT)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one training step did.

    ``ewc_penalty`` is the penalty λ·‖(ΔW − ΔW*)·C^½‖² measured after the step (0 before the
    first boundary or with λ = 0); ``task_boundary`` is True when this step started a new task
    (detected before the sample was learned from).
    """

    applied: bool
    notes: list[str] = field(default_factory=list)
    ewc_penalty: float = 0.0
    task_boundary: bool = False
    task_count: int = 0


class TrainingPipeline:
    """Trains a MicroLoRA one sample at a time under EWC++ (see the module docstring)."""

    def __init__(self, config: TrainingConfig) -> None:
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig, got {type(config).__name__}")
        self.config = config
        self._ewc: EwcImportance | None = None
        self._window: InputWindow | None = None
        self._detector: ShiftDetector | None = None
        self._task_count = 0
        self._samples_seen = 0
        self._boundary_samples: list[int] = []

    # ------------------------------------------------------------------ introspection
    @property
    def task_count(self) -> int:
        """Tasks whose importance is folded into the penalty (boundaries passed)."""
        return self._task_count

    @property
    def samples_seen(self) -> int:
        """Inputs that went through :meth:`train_step` (learned from or gated) as traffic."""
        return self._samples_seen

    @property
    def boundary_samples(self) -> tuple[int, ...]:
        """For each boundary, how many inputs had been seen before the new task began."""
        return tuple(self._boundary_samples)

    @property
    def initialized(self) -> bool:
        return self._ewc is not None

    # ------------------------------------------------------------------ setup
    def init_for_lora(self, lora: MicroLoRA) -> None:
        """Size the importance, anchors and detector for ``lora``; forgets any earlier state."""
        _check_lora(lora)
        c = self.config
        ewc = EwcImportance.for_lora(lora, rank=c.ewc_rank, gamma=c.online_ewc_gamma)
        self._install(ewc)
        self._task_count = 0
        self._samples_seen = 0
        self._boundary_samples = []

    def _install(self, ewc: EwcImportance) -> None:
        c = self.config
        self._ewc = ewc
        self._window = InputWindow(c.fisher_samples, ewc.in_features)
        self._detector = ShiftDetector(
            ewc.in_features, reference_samples=c.fisher_samples, max_directions=c.ewc_rank
        )

    def _ready(self, lora: MicroLoRA) -> EwcImportance:
        self._check_match(lora)
        if self._ewc is None:
            self.init_for_lora(lora)
        ewc = self._ewc
        assert ewc is not None
        return ewc

    def _check_match(self, lora: MicroLoRA) -> None:
        _check_lora(lora)
        ewc = self._ewc
        if ewc is not None and not ewc.matches(lora):
            raise ConfigMismatchError(
                f"lora has shape {_shape_of(lora)}, this pipeline was set up for "
                f"{ewc.shape_meta()}; call init_for_lora first"
            )

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        lora: MicroLoRA,
        input: Any,
        feedback: AdaptFeedback,
        module: TargetModule | None = None,
    ) -> StepResult:
        """Learn from one (input, feedback) pair; see the module docstring for the order.

        Target and gradient feedback rated below ``quality_threshold`` is not learned from
        (``applied`` False, with a note); the input still counts as traffic for importance and
        boundary detection.

        Everything that can be refused is refused before any state changes: the arguments, and
        the gradient (accumulated before the input is tracked, which reads only ΔW).
        """
        self._check_match(lora)
        x = self._input(input, lora.config.in_features)
        if not isinstance(feedback, AdaptFeedback):
            raise TypeError(f"feedback must be an AdaptFeedback, got {type(feedback).__name__}")
        vec = feedback.vector
        out = lora.config.out_features
        if vec is not None and vec.shape[0] != out:
            raise InvalidInputError(
                f"feedback {feedback.kind.value} must have shape ({out},), got {vec.shape}"
            )
        if module is not None:
            lora.factors(module)  # raises for a module the adapter does not target
        return self._learn(lora, x, feedback, module, track=True)

    def train_sample(
        self, lora: MicroLoRA, sample: TrainingSample, *, replay: bool = False
    ) -> StepResult:
        """Learn from a sample; ``replay`` marks a kept sample seen again (Deep loop).

        A replayed sample below ``quality_threshold`` is skipped whatever its feedback form, and
        replayed inputs neither feed the importance window nor the boundary detector: old traffic
        replayed is not a shift, and its importance was taken when it was new.
        """
        if not isinstance(sample, TrainingSample):
            raise TypeError(f"sample must be a TrainingSample, got {type(sample).__name__}")
        if not replay:
            return self.train_step(lora, sample.input_embedding, sample.to_feedback())
        self._check_match(lora)
        x = self._input(sample.input_embedding, lora.config.in_features)
        threshold = self.config.quality_threshold
        if sample.quality < threshold:
            ewc = self._ready(lora)
            note = (
                f"skipped: replayed sample quality {sample.quality:.3f} is below "
                f"quality_threshold {threshold:.3f}"
            )
            return StepResult(False, [note], self._penalty(lora, ewc), False, self._task_count)
        return self._learn(lora, x, sample.to_feedback(), None, track=False)

    def replay(self, lora: MicroLoRA, samples: Iterable[TrainingSample]) -> list[StepResult]:
        """:meth:`train_sample` with ``replay=True`` for each sample, in order."""
        return [self.train_sample(lora, s, replay=True) for s in samples]

    def _input(self, value: Any, in_features: int) -> np.ndarray:
        x = as_f32(value, "input")
        if x.ndim != 1 or x.shape[0] != in_features:
            raise InvalidInputError(f"input must have shape ({in_features},), got {x.shape}")
        _check_row(k_update.vec_input_status(x), "input")
        return x

    def _track(self, lora: MicroLoRA, ewc: EwcImportance, x: np.ndarray) -> bool:
        """Feed the detector and the importance window; start a new task on a shift."""
        window = self._window
        detector = self._detector
        assert window is not None and detector is not None
        boundary = False
        if self.config.boundary_detection and detector.update(x):
            # The last shift_age inputs (this one included) already belong to the new task.
            moved = min(detector.shift_age - 1, window.count)
            rows = window.ordered()
            old, new = rows[: rows.shape[0] - moved], rows[rows.shape[0] - moved :]
            self._begin_task(lora, ewc, old, self._samples_seen - moved)
            window.refill(new)
            detector.restart(np.concatenate([new, x[None, :]]))
            boundary = True
            _log.info(
                "task_boundary_detected", task_count=self._task_count, samples=self._samples_seen
            )
        window.push(x)
        self._samples_seen += 1
        return boundary

    def _learn(
        self,
        lora: MicroLoRA,
        x: np.ndarray,
        feedback: AdaptFeedback,
        module: TargetModule | None,
        *,
        track: bool,
    ) -> StepResult:
        """Gate, accumulate, then (with ``track``) count x as traffic, then apply. Tracking
        may start a task, which anchors at the current ΔW: the accumulated gradient is not
        applied yet, so the anchor is the one tracking first would give, and an input whose
        gradient the adapter refuses has changed nothing."""
        c = self.config
        notes: list[str] = []
        gated = feedback.kind in _GATED and feedback.quality < c.quality_threshold
        adapted = False if gated else lora.adapt(x, feedback, module)
        declined = None if gated or adapted else lora.last_note or "declined by the adapter"
        ewc = self._ready(lora)  # a pipeline first used here is set up only now
        boundary = self._track(lora, ewc, x) if track else False
        if boundary:
            notes.append(f"task boundary detected: task {self._task_count + 1} begins")
        if gated:
            notes.append(
                f"skipped: {feedback.kind.value} feedback quality {feedback.quality:.3f} is "
                f"below quality_threshold {c.quality_threshold:.3f}"
            )
            return StepResult(False, notes, self._penalty(lora, ewc), boundary, self._task_count)
        if declined is not None:
            notes.append(declined)
            return StepResult(False, notes, self._penalty(lora, ewc), boundary, self._task_count)
        if not lora.apply_updates(c.learning_rate, max_norm=c.max_grad_norm):
            notes.append(lora.last_note or "update rejected by the adapter")
            return StepResult(False, notes, self._penalty(lora, ewc), boundary, self._task_count)
        penalty = 0.0
        if c.ewc_lambda > 0.0 and ewc.active:
            tau = 2.0 * c.learning_rate * c.ewc_lambda
            raw = ewc.step(lora, tau, lora.modules)
            if raw < 0.0:
                notes.append("EWC++ step skipped: it would not have been finite")
                penalty = self._penalty(lora, ewc)
            else:
                penalty = c.ewc_lambda * raw
        return StepResult(True, notes, penalty, boundary, self._task_count)

    # ------------------------------------------------------------------ tasks and importance
    def start_new_task(self, lora: MicroLoRA) -> None:
        """End the current task: fold its recent inputs' importance in, anchor at current ΔW."""
        ewc = self._ready(lora)
        window = self._window
        detector = self._detector
        assert window is not None and detector is not None
        self._begin_task(lora, ewc, window.ordered(), self._samples_seen)
        window.clear()
        detector.restart()

    def _begin_task(
        self, lora: MicroLoRA, ewc: EwcImportance, inputs: np.ndarray, at_sample: int
    ) -> None:
        ewc.fold(lora, inputs)
        self._task_count += 1
        self._boundary_samples.append(at_sample)

    def track(self, lora: MicroLoRA, x: Any) -> bool:
        """Count ``x`` as traffic without learning from it; True when it started a new task.

        For callers that learn in batches (the Background loop): the input feeds the importance
        window and, with ``boundary_detection``, the shift detector; a detected shift folds the
        importance and re-anchors on ``lora`` as it is now.
        """
        self._check_match(lora)
        row = self._input(x, lora.config.in_features)
        return self._track(lora, self._ready(lora), row)

    def track_many(
        self,
        lora: MicroLoRA,
        xs: Any,
        *,
        validated: bool = False,
        projected: Projected | None = None,
        complete: Callable[[], object] | None = None,
    ) -> list[int]:
        """:meth:`track` for the rows of ``xs`` in order; the row indices that began a task.

        Vectorised for the Background loop, which tracks whole batches: the same boundaries and
        window as tracking the rows one by one (the detector's sums may differ in the last bits).
        ``validated=True`` skips the pass that checks every row as :meth:`track` does (finite,
        ‖x‖² within ``MAX_INPUT_SQ_NORM``), for rows taken from :class:`TrainingSample` inputs,
        which were checked when the samples were built. ``projected``: the rows' projections
        on :meth:`scan_basis`, taken while they were gathered (see ``ShiftDetector.update_many``).
        ``complete``: the rows of ``xs`` before its last ``fisher_samples`` may not be written
        yet; it writes them, and is called before any of them is read (the detector reads the
        rows when it cannot take ``projected``, the window when a shift rearranges it).
        """
        self._check_match(lora)
        dim = lora.config.in_features
        rows = as_f32(xs, "xs")
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise InvalidInputError(f"xs must have shape (n, {dim}), got {rows.shape}")
        if not validated:
            if complete is not None:  # the check reads every row
                complete()
                complete = None
            bad = int(k_update.rows_input_status(rows))  # GIL-free, no temporary array
            if bad >= 0:
                _check_row(bad % 4, f"xs[{bad // 4}]")
        ewc = self._ready(lora)
        window = self._window
        detector = self._detector
        assert window is not None and detector is not None
        fired: list[int] = []
        pos = 0
        n = rows.shape[0]
        detecting = self.config.boundary_detection
        if (
            complete is not None
            and detecting
            and not (projected is not None and detector.takes(projected, n))
        ):
            complete()  # the detector reads the rows themselves
            complete = None
        while pos < n:
            rest = rows[pos:]
            if not detecting:
                hit = -1
            else:  # the projections are of the rows from the first one on
                hit = detector.update_many(rest, projected if pos == 0 else None)
            if hit < 0:
                window.push_many(rest)
                self._samples_seen += rest.shape[0]
                break
            if complete is not None:  # the window and the detector read earlier rows now
                complete()
                complete = None
            window.push_many(rest[:hit])
            self._samples_seen += hit
            x = rest[hit]
            moved = min(detector.shift_age - 1, window.count)
            ordered = window.ordered()
            old, new = ordered[: ordered.shape[0] - moved], ordered[ordered.shape[0] - moved :]
            self._begin_task(lora, ewc, old, self._samples_seen - moved)
            window.refill(new)
            detector.restart(np.concatenate([new, x[None, :]]))
            window.push(x)
            self._samples_seen += 1
            fired.append(pos + hit)
            _log.info(
                "task_boundary_detected", task_count=self._task_count, samples=self._samples_seen
            )
            pos += hit + 1
        return fired

    def scan_basis(self) -> np.ndarray | None:
        """The basis :meth:`track_many` will project the next rows on, if any (boundary
        detection on, past the detector's reference phase): see ``ShiftDetector.scan_basis``."""
        if not self.config.boundary_detection or self._detector is None:
            return None
        return self._detector.scan_basis()

    def prox_step(self, lora: MicroLoRA, tau: float) -> float:
        """One EWC++ proximal step of strength ``tau`` (2·η·λ for a step of size η) on every
        module; the raw penalty after it, 0 before the first boundary, −1 if it was skipped
        because it would not have been finite (the weights then stay as they were)."""
        ewc = self._ready(lora)
        if not ewc.active or tau <= 0.0:
            return 0.0
        return ewc.step(lora, float(tau), lora.modules)

    def shift_anchor(self, before: MicroLoRA, after: MicroLoRA) -> None:
        """Move the anchor of the last ended task by ``after``'s ΔW minus ``before``'s: a
        change to that task's learning that arrives after its boundary (see
        ``BackgroundLoop.install``)."""
        ewc = self._ready(after)
        self._check_match(before)
        ewc.shift_anchor(before, after)

    def replay_ewc(self, lora: MicroLoRA) -> EwcArrays | None:
        """The EWC++ state ``MicroLoRA.replay`` takes for the proximal steps :meth:`prox_step`
        would take on ``lora``; None while no task is protected (they would change nothing)."""
        ewc = self._ready(lora)
        if not ewc.active:
            return None
        return ewc.replay_arrays(lora.modules)

    def observe(self, x: Any) -> None:
        """Count an input toward the current task's importance without a training step.

        For inputs the host served but gave no feedback on. It does not feed the boundary
        detector (a detected boundary needs the adapter to re-anchor).
        """
        if self._ewc is None or self._window is None:
            raise InvalidInputError("observe needs an initialised pipeline: call init_for_lora")
        self._window.push(self._input(x, self._ewc.in_features))

    def ewc_penalty(self, lora: MicroLoRA) -> float:
        """λ·‖(ΔW − ΔW*)·C^½‖² summed over the adapter's modules, measured now."""
        _check_lora(lora)
        if self._ewc is None:
            return 0.0
        ewc = self._ready(lora)
        return self._penalty(lora, ewc)

    def _penalty(self, lora: MicroLoRA, ewc: EwcImportance) -> float:
        lam = self.config.ewc_lambda
        if lam == 0.0 or not ewc.active:
            return 0.0
        return lam * ewc.penalty(lora)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named float32 arrays) holding everything a restore needs."""
        meta: dict[str, Any] = {
            "format": _STATE_FORMAT,
            "config": self.config.to_dict(),
            "task_count": self._task_count,
            "samples_seen": self._samples_seen,
            "boundary_samples": list(self._boundary_samples),
            "shape": None,
        }
        arrays: dict[str, np.ndarray] = {}
        if self._ewc is None or self._window is None or self._detector is None:
            return meta, arrays
        meta["shape"] = self._ewc.shape_meta()
        ewc_meta, ewc_arrays = self._ewc.state()
        win_meta, win_rows = self._window.state()
        det_meta, det_arrays = self._detector.state()
        meta.update(ewc=ewc_meta, window=win_meta, detector=det_meta)
        arrays.update(ewc_arrays)
        arrays.update(det_arrays)
        arrays["window.inputs"] = win_rows
        return meta, arrays

    def load_state_dict(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` output; validates all of it before changing anything.

        The configuration must be the one this pipeline was built with.
        """
        if not isinstance(meta, dict) or not isinstance(arrays, dict):
            raise TypeError("meta and arrays must be dicts (from state_dict)")
        if meta.get("format") != _STATE_FORMAT:
            raise FormatError(
                f"meta is not a {_STATE_FORMAT} state (format {meta.get('format')!r})"
            )
        try:
            config = TrainingConfig.from_dict(dict(meta["config"]))
            task_count = int(meta["task_count"])
            samples_seen = int(meta["samples_seen"])
            boundaries = [int(v) for v in meta["boundary_samples"]]
            shape = meta["shape"]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"training state metadata is malformed: {exc}") from None
        if config != self.config:
            raise ConfigMismatchError(
                f"training state was saved with {config}, this pipeline has {self.config}"
            )
        if not all(0 <= v <= MAX_COUNT for v in (task_count, samples_seen, *boundaries)):
            raise FormatError("training state has a counter outside [0, 2**53]")
        if shape is None:
            self._ewc = self._window = self._detector = None
            self._task_count, self._samples_seen = task_count, samples_seen
            self._boundary_samples = boundaries
            return
        try:
            modules = tuple(TargetModule.parse(m) for m in shape["modules"])
            ewc = EwcImportance(
                in_features=int(shape["in_features"]),
                out_features=int(shape["out_features"]),
                lora_rank=int(shape["lora_rank"]),
                modules=modules,
                rank=config.ewc_rank,
                gamma=config.online_ewc_gamma,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"training state shape is malformed: {exc}") from None
        previous = (self._ewc, self._window, self._detector)
        self._install(ewc)
        try:
            assert self._window is not None and self._detector is not None
            ewc.load(meta["ewc"], arrays)
            self._window.load(meta["window"], np.asarray(arrays["window.inputs"]))
            self._detector.load(meta["detector"], arrays)
        except (KeyError, TypeError, ValueError) as exc:
            self._ewc, self._window, self._detector = previous
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"training state is incomplete: {exc}") from None
        self._task_count = task_count
        self._samples_seen = samples_seen
        self._boundary_samples = boundaries


def _check_row(status: int, name: str) -> None:
    if status == k_update.INPUT_NOT_FINITE:
        raise InvalidInputError(f"{name} contains NaN or inf")
    if status == k_update.INPUT_TOO_LARGE:
        raise InvalidInputError(
            f"{name} is finite but too large: ‖x‖² is above 1e38, where float32 cannot hold it "
            "and no update could learn from it"
        )


def _check_lora(lora: object) -> None:
    if not isinstance(lora, MicroLoRA):
        raise TypeError(f"lora must be a MicroLoRA, got {type(lora).__name__}")


def _shape_of(lora: MicroLoRA) -> dict[str, Any]:
    c = lora.config
    return {
        "in_features": c.in_features,
        "out_features": c.out_features,
        "lora_rank": c.rank,
        "modules": [m.value for m in c.target_modules],
    }
