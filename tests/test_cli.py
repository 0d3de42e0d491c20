"""The ``sona`` command line: help, --log-level, Ctrl-C, and the demo's logs and exit status."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import sona.demo.command
import sona.inspect
from sona.bench import BENCHES
from sona.cli import BENCH_HELP, main
from sona.config import SonaLlmConfig, SupervisionConfig
from sona.demo import simulation
from sona.demo.simulation import DemoSettings
from sona.lora import MicroLoRA, MicroLoraConfig

SONA = shutil.which("sona", path=str(Path(sys.executable).parent)) or "sona"
TINY = ["--dim", "16", "--domains", "3", "--steps", "80"]  # five phases of one batch each


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures the ``sona`` loggers for the process; put them back afterwards."""
    root, demo = logging.getLogger("sona"), logging.getLogger("sona.demo")
    handlers, level, propagate, demo_level = (
        root.handlers[:],
        root.level,
        root.propagate,
        demo.level,
    )
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = propagate
    demo.setLevel(demo_level)


def _main_or_fail(argv: list[str]) -> int:
    """``main(argv)``, failing the test (not aborting the session) if Ctrl-C escapes it."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped sona.cli.main")


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    assert isinstance(code, int)
    return code


# ---------------------------------------------------------------------------- help
def test_top_level_help_is_a_description_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and "configures logging" not in text
    assert "demo" in text and "bench" in text and "inspect" in text
    assert "DEBUG" in text and "WARNING" in text


def test_bench_help_describes_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in BENCHES:
        assert f"{name} {' '.join(BENCH_HELP[name].split())}" in text, name


def test_inspect_help_says_what_path_may_be(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoint_dir" in text and "PEFT" in text


def test_demo_help_gives_every_limit_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "at least 16 per phase",
        "at most 1,000,000",
        "16 to 4096",
        "1 to 8",
        "0 to 0.5",
        "restart budget",
        ">= 0 (default 0)",
    ):
        assert needle in text, needle


# ---------------------------------------------------------------------------- --log-level
@pytest.mark.parametrize("level", ["FOO", "basic_format", "notset"])
def test_an_unknown_log_level_is_a_usage_error(
    level: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_code(["--log-level", level, "inspect", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--log-level" in err and "invalid choice" in err and "Traceback" not in err


def test_log_level_names_are_accepted_in_any_case(tmp_path: Path) -> None:
    assert main(["--log-level", "debug", "inspect", str(tmp_path / "nothing")]) == 2
    assert logging.getLogger("sona").level == logging.DEBUG


def test_quiet_demo_respects_an_explicit_log_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--quiet", "--no-ewc", *TINY, "--out", str(tmp_path)]
    assert main(["--log-level", "ERROR", *argv]) == 0
    assert capsys.readouterr().err == ""
    assert main(argv) == 0  # without a level, --quiet shows the INFO lines
    assert "run_started" in capsys.readouterr().err


# ---------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_is_one_line_and_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(path: str) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sona.inspect, "run", interrupted)
    assert _main_or_fail(["inspect", "anything"]) == 130
    assert capsys.readouterr().err == "sona inspect: interrupted\n"


def test_ctrl_c_inside_a_task_group_is_one_line_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(path: str) -> int:
        raise BaseExceptionGroup("unhandled errors in a TaskGroup", [KeyboardInterrupt()])

    monkeypatch.setattr(sona.inspect, "run", interrupted)
    assert _main_or_fail(["inspect", "anything"]) == 130
    assert capsys.readouterr().err == "sona inspect: interrupted\n"


def test_ctrl_c_during_a_bench_names_the_bench(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Which of several benchmarks a script ran was interrupted: the line says."""
    import sona.bench.learning

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sona.bench.learning, "run", interrupted)
    assert _main_or_fail(["bench", "learning"]) == 130
    assert capsys.readouterr().err == "sona bench learning: interrupted\n"


def test_a_group_without_an_interrupt_still_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [RuntimeError("a bug")])

    monkeypatch.setattr(sona.inspect, "run", broken)
    with pytest.raises(ExceptionGroup):
        main(["inspect", "anything"])


def test_errors_without_an_interrupt_still_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sona.inspect, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "anything"])


def test_ctrl_c_during_a_demo_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sona.demo.command, "run_all", interrupted)
    out = tmp_path / "new" / "out"
    assert _main_or_fail(["demo", "--quiet", *TINY, "--out", str(out)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "sona demo: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_sigint_stops_a_running_demo_without_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [SONA, "demo", "--quiet", "--dim", "64", "--steps", "200000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:  # wait until the first run is under way
            seen.append(line)
            if "phase_started" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "CancelledError" not in err, err
    assert err.splitlines()[-1] == "sona demo: interrupted"
    assert not out.exists()


# ---------------------------------------------------------------------------- the demo
def test_quiet_log_shows_every_phase_of_a_short_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--quiet", *TINY, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    for run in ("sona", "no-ewc"):
        phases = [
            int(m.group(1))
            for line in err.splitlines()
            if "phase_started" in line and f"run={run}" in line
            if (m := re.search(r"phase=(\d+)", line))
        ]
        assert phases == [0, 1, 2, 3, 4], run


def test_a_run_the_supervisor_gave_up_on_exits_1_and_keeps_its_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configured = simulation.runtime_config

    def no_restarts(settings: DemoSettings, phases: int, *, ewc: bool) -> SonaLlmConfig:
        config = configured(settings, phases, ewc=ewc)
        return dataclasses.replace(config, supervision=SupervisionConfig(max_restarts=0))

    monkeypatch.setattr(simulation, "runtime_config", no_restarts)
    argv = ["demo", "--quiet", "--no-ewc", "--chaos", "0.2", "--out", str(tmp_path)]
    assert main([*argv, "--dim", "48", "--domains", "2", "--steps", "1500"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sona demo: run 'no-ewc' stopped early: the supervisor gave up")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"]["no-ewc"]["stopped_early"].startswith("the supervisor gave up")


# ---------------------------------------------------------------------------- closed stdout
def _run_into_a_closed_pipe(argv: list[str], *, buffered: bool) -> subprocess.CompletedProcess[str]:
    """``sona argv`` with stdout a pipe nobody reads any more, as under ``sona ... | head -1``
    once head has exited. Buffered, the write fails only when Python flushes stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [SONA, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=300
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize("buffered", [True, False])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path, buffered: bool) -> None:
    adapter = tmp_path / "adapter.sona"
    MicroLoRA(MicroLoraConfig.for_hidden_dim(16), seed=0).save(adapter)
    done = _run_into_a_closed_pipe(["inspect", str(adapter)], buffered=buffered)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as for a program the signal ended


def test_a_closed_pipe_met_inside_a_task_group_ends_quietly_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def reader_gone(path: str) -> int:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [BrokenPipeError(32, "pipe")])

    monkeypatch.setattr(sona.inspect, "run", reader_gone)
    assert main(["inspect", "anything"]) == 141
    assert capsys.readouterr().err == ""


def test_a_bench_whose_settings_overflow_the_adapter_stops_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A learning rate of 1e30 drives the adapter past float32; the adapter refuses to go on,
    and the bench says so instead of showing a traceback."""
    args = ["--lr-target", "1e30", "--forms", "target", "--updates", "50", "--every", "25"]
    assert main(["bench", "learning", *args, "--seeds", "1", "--dim", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sona bench learning: stopped: the gradient overflows float32"), err
    assert err.count("\n") == 1


def test_a_bench_whose_module_cannot_be_imported_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A benchmark whose optional dependencies are missing still shows in the help; running it
    is a usage error that says so, not a success that printed nothing."""
    monkeypatch.setitem(BENCHES, "absent", "sona.bench._not_in_this_build")
    assert main(["bench", "absent", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "sona bench absent: not available in this build\n"
