"""Bad ``sona bench`` options are refused up front: one line naming the option, exit status 2,
no traceback, and nothing measured first."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sona.bench import forgetting, kernels, options, soak
from sona.lora_config import MAX_FEATURES


def parser_for(bench: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The bench's parser as ``sona bench NAME`` builds it."""
    module = importlib.import_module(f"sona.bench.{bench}")
    parser = argparse.ArgumentParser(prog=f"sona bench {bench}")
    parser.add_argument("--json", action="store_true")
    module.add_arguments(parser)
    return module, parser


def refused(capsys: pytest.CaptureFixture[str], call: Any, *args: Any) -> str:
    """Run ``call`` expecting an argparse-style refusal; its one-line error."""
    with pytest.raises(SystemExit) as exc:
        call(*args)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last
    return last


@pytest.mark.parametrize(
    ("bench", "argv", "option"),
    [
        ("kernels", ["--samples", "0"], "--samples"),
        ("kernels", ["--samples", "-5"], "--samples"),
        ("kernels", ["--ranks", "0"], "--ranks"),
        ("kernels", ["--ranks", "abc"], "--ranks"),
        ("kernels", ["--dims", "-4"], "--dims"),
        ("kernels", ["--batches", "0"], "--batches"),
        ("runtime", ["--rounds", "0"], "--rounds"),
        ("runtime", ["--paced", "0"], "--paced"),
        ("runtime", ["--saturated", "-1"], "--saturated"),
        ("runtime", ["--switch-interval", "0"], "--switch-interval"),
        ("runtime", ["--switch-interval", "-1"], "--switch-interval"),
        ("runtime", ["--seconds", "0"], "--seconds"),
        ("runtime", ["--latency-samples", "0"], "--latency-samples"),
        ("runtime", ["--dim", "1"], "--dim"),
        ("learning", ["--every", "0"], "--every"),
        ("learning", ["--updates", "-5"], "--updates"),
        ("learning", ["--dim", "0"], "--dim"),
        ("learning", ["--lr-target", "-1"], "--lr-target"),
        ("learning", ["--lr-target", "nan"], "--lr-target"),
        ("learning", ["--seeds", "0"], "--seeds"),
        ("learning", ["--explore-std", "inf"], "--explore-std"),
        ("learning", ["--forms", "telepathy"], "--forms"),
        ("forgetting", ["--seeds", "0"], "--seeds"),
        ("forgetting", ["--tasks", "0"], "--tasks"),
        ("forgetting", ["--tasks", "1"], "--tasks"),
        ("forgetting", ["--steps-per-task", "-3"], "--steps-per-task"),
        ("forgetting", ["--lambdas", "-1"], "--lambdas"),
        ("forgetting", ["--torch-lambdas", "nan"], "--torch-lambdas"),
        ("forgetting", ["--ranks", "0"], "--ranks"),
        ("forgetting", ["--lr", "0"], "--lr"),
        ("soak", ["--minutes", "0"], "--minutes"),
        ("soak", ["--window", "0"], "--window"),
        ("soak", ["--window", "-1"], "--window"),
        ("soak", ["--dim", "0"], "--dim"),
        ("soak", ["--chaos", "2"], "--chaos"),
        ("soak", ["--chaos", "1"], "--chaos"),
        ("soak", ["--seed", "-1"], "--seed"),
        ("soak", ["--seed", str(2**62)], "--seed"),
        ("soak", ["--rate", "nan"], "--rate"),
        # wider than any adapter or dense task: a traceback, some after earlier parts had run
        ("kernels", ["--dims", "16,2000000"], "--dims"),
        ("runtime", ["--dim", "2000000"], "--dim"),
        ("soak", ["--dim", "2000000"], "--dim"),
        ("learning", ["--dim", "8193"], "--dim"),
        ("forgetting", ["--dim", "8193"], "--dim"),
        ("soak", ["--minutes", "1e300"], "--minutes"),
    ],
)
def test_bad_values_are_refused_while_parsing(
    capsys: pytest.CaptureFixture[str], bench: str, argv: list[str], option: str
) -> None:
    _, parser = parser_for(bench)
    line = refused(capsys, parser.parse_args, argv)
    assert f"sona bench {bench}: error: argument {option}:" in line


def test_the_defaults_parse_as_they_did() -> None:
    _, parser = parser_for("kernels")
    args = parser.parse_args([])
    assert (args.ranks, args.dims, args.batches) == ([1, 2, 8], [768, 4096], [1, 32])
    _, parser = parser_for("forgetting")
    args = parser.parse_args(["--torch-lambdas", ""])
    assert args.lambdas == [1.0, 10.0, 100.0] and args.torch_lambdas == []


def _never(*_args: Any, **_kw: Any) -> Any:
    raise AssertionError("the bench started before refusing its options")


def test_kernels_refuse_a_rank_above_a_width(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "_cell", _never)
    _, parser = parser_for("kernels")
    line = refused(capsys, kernels.run, parser.parse_args(["--ranks", "8", "--dims", "4,64"]))
    assert "--ranks" in line and "--dims" in line


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--tasks", "20"], "--tasks 20 × --subspace-dim 6 = 120 exceeds --dim 96"),
        (["--ranks", "2,200"], "argument --ranks: rank 200 exceeds --dim 96"),
    ],
)
def test_forgetting_refuses_a_setting_it_cannot_build(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    named: str,
) -> None:
    monkeypatch.setattr(forgetting, "evaluate", _never)
    _, parser = parser_for("forgetting")
    assert named in refused(capsys, forgetting.run, parser.parse_args(argv))


def test_soak_refuses_a_window_longer_than_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(soak, "_soak", _never)
    _, parser = parser_for("soak")
    line = refused(capsys, soak.run, parser.parse_args(["--minutes", "0.01", "--window", "1"]))
    assert "argument --window: 1 s is longer than the run" in line


def test_soak_refuses_more_report_rows_than_it_can_show(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny window made a list of ~10⁸ rows once the runtime ran (MemoryError)."""
    monkeypatch.setattr(soak, "_soak", _never)
    _, parser = parser_for("soak")
    argv = ["--minutes", "0.01", "--window", "1e-9"]
    assert "report rows" in refused(capsys, soak.run, parser.parse_args(argv))


def test_soak_refuses_no_log_with_a_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(soak, "_soak", _never)
    _, parser = parser_for("soak")
    args = parser.parse_args(["--no-log", "--dir", str(tmp_path / "state")])
    line = refused(capsys, soak.run, args)
    assert "--no-log" in line and "--dir" in line


def test_soak_refuses_a_directory_it_cannot_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, parser = parser_for("soak")
    a_file = tmp_path / "file"
    a_file.write_text("")
    used = tmp_path / "used"
    used.mkdir()
    (used / "checkpoint-000000000001.sona").write_text("")
    for path in (a_file, a_file / "below", used):
        line = refused(capsys, parser.parse_args, ["--dir", str(path)])
        assert "argument --dir:" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_soak_reports_a_directory_the_runtime_cannot_create(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, parser = parser_for("soak")
    argv = ["--dir", "/proc/sona-nope", "--minutes", "0.01", "--dim", "16", "--rate", "10"]
    assert "argument --dir:" in refused(capsys, soak.run, parser.parse_args(argv))


def test_option_types_name_the_accepted_range() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 1\), got '1'"):
        options.float_in(0.0, 1.0, lo_open=False, hi_open=True)("1")
    assert options.float_in(0.0, 1.0, lo_open=False, hi_open=True)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        options.positive_ints("1,,2")
    assert options.int_in(2)("2") == 2


@pytest.mark.parametrize(
    ("bench", "argv", "dest", "value"),
    [
        # the top of each range is accepted: a bound one too tight refused a setting that runs
        ("soak", ["--seed", str(2**62 - 1)], "seed", 2**62 - 1),
        ("soak", ["--seed", "0"], "seed", 0),
        ("learning", ["--dim", "8192"], "dim", 8192),
        ("forgetting", ["--dim", "8192"], "dim", 8192),
        ("runtime", ["--dim", str(MAX_FEATURES)], "dim", MAX_FEATURES),
        ("kernels", ["--dims", f"1,{MAX_FEATURES}"], "dims", [1, MAX_FEATURES]),
    ],
)
def test_the_ends_of_each_range_are_accepted(
    bench: str, argv: list[str], dest: str, value: object
) -> None:
    _, parser = parser_for(bench)
    assert getattr(parser.parse_args(argv), dest) == value


def test_closed_upper_bounds_include_their_end() -> None:
    assert options.int_in(0, 5)("5") == 5
    assert options.ints_in(1, 3)("1,3") == [1, 3]
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[0, 5\], got '6'"):
        options.int_in(0, 5)("6")
