"""The names API.md promises are importable from where it says, exactly once each."""

from __future__ import annotations

import importlib

import pytest

PROMISED = {
    "sona": [
        "ConsolidationStrategy", "OverflowPolicy", "SupervisionConfig", "SonaLlmConfig",
        "SonaLlm", "SonaRuntime", "AdaptationResult", "BackgroundResult", "DeepResult",
        "LearningStats", "Chaos",
    ],
    "sona.lora": [
        "TargetModule", "MicroLoraConfig", "AdaptFeedback", "MicroLoRA", "ComposedAdapter",
    ],
    "sona.training": ["TrainingConfig", "TrainingSample", "TrainingPipeline"],
    "sona.actors": [
        "OverflowPolicy", "RestartStrategy", "Backoff", "Actor", "Supervisor", "ActorRef",
        "EventBus", "Backpressure", "SupervisorGaveUp",
    ],
    "sona.events": [
        "InstantApplied", "InstantSkipped", "BackgroundCompleted", "DeepCompleted",
        "TaskBoundary", "UpdateRejected", "SamplesDropped", "DeadLettered", "LoopCrashed",
        "LoopRestarted", "SupervisorGaveUp", "Lagged", "CheckpointWritten",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(PROMISED))
def test_promised_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in PROMISED[module] if not hasattr(mod, name)]
    assert not missing


def test_top_level_reexports_are_the_same_objects() -> None:
    import sona.actors

    import sona
    import sona.lora

    assert sona.OverflowPolicy is sona.actors.OverflowPolicy
    assert sona.MicroLoRA is sona.lora.MicroLoRA
    assert len(sona.__all__) == len(set(sona.__all__))


def test_events_have_at_and_seq() -> None:
    import msgspec

    import sona.events as ev

    for name in PROMISED["sona.events"]:
        cls = getattr(ev, name)
        fields = {f.name for f in msgspec.structs.fields(cls)}
        assert {"at", "seq"} <= fields, name


def _imports(folder: str) -> set[str]:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / folder
    names: set[str] = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("folder", "allowed"),
    [
        # llvmlite is Numba's code generator, for the prefetch hint written in LLVM IR
        ("kernels", {"numpy", "numba", "llvmlite", "sona.kernels"}),
        ("actors", {"anyio", "msgspec", "structlog", "sona.actors"}),
    ],
)
def test_layering_kernels_and_actors_import_only_their_dependencies(
    folder: str, allowed: set[str]
) -> None:
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    outside = {
        name
        for name in _imports(folder)
        if name.split(".")[0] not in stdlib
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    }
    assert not outside, f"{folder}/ imports {sorted(outside)}"
