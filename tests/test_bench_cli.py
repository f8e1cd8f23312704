"""`fastpar bench`: suite selection, and one plot per suite from rows shaped like its CSV."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from fastpar.bench_cli import SUITES, plot, run


def _rows(name: str) -> list[dict[str, str]]:
    suite = SUITES[name]
    generator = random.Random(name)
    rows = []
    for index in range(4):
        row = {"device": "test device"}
        for column in suite.x.split("/"):
            row[column] = str(2 ** (10 + index)) if suite.kind == "lines" else f"{column}{index}"
        if suite.series:
            row[suite.series] = str(2 + index % 2)
        for y in suite.ys:
            row[y] = f"{generator.uniform(0.5, 10):.3f}"
        rows.append(row)
    return rows


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_suite_plots(name: str, tmp_path: Path) -> None:
    png = tmp_path / f"{name}.png"
    plot(SUITES[name], _rows(name), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_suite_names_an_existing_script() -> None:
    from fastpar.bench_cli import BENCH_DIR

    for suite in SUITES.values():
        assert (BENCH_DIR / suite.script).exists(), suite.script


def test_unknown_suite_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["nosuch"], tmp_path) == 2
    assert "unknown benchmark 'nosuch'; choose from lstm, allreduce" in capsys.readouterr().err


def test_relative_results_folder_is_the_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts run in the checkout; a relative --results still means the caller's folder."""
    import fastpar.bench_cli as bench_cli

    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    # A stand-in suite script: writes a two-row CSV where --csv says, as the real ones do.
    (checkout / "bench" / "fake.py").write_text(
        "import sys\n"
        "path = sys.argv[sys.argv.index('--csv') + 1]\n"
        "open(path, 'w').write('device,shape,impl,fwd_ms,fwdbwd_ms\\n'\n"
        "                      'cpu,s,a,1.0,2.0\\ncpu,s,b,1.5,\\n')\n"
    )
    suite = SUITES["lstm"]
    monkeypatch.setattr(bench_cli, "BENCH_DIR", checkout / "bench")
    monkeypatch.setitem(
        bench_cli.SUITES, "fake", bench_cli.Suite("fake.py", suite.title, "bars", suite.x, suite.ys)
    )
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    assert run(["fake"], Path("out")) == 0
    assert (caller / "out" / "fake.csv").read_text().startswith("device,shape")
    assert (caller / "out" / "fake.png").read_bytes()[:4] == b"\x89PNG"
    assert not (checkout / "out").exists()


def test_a_results_folder_that_cannot_be_made_is_refused_before_any_suite_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--results` naming a file ended in a FileExistsError traceback."""
    import fastpar.bench_cli as bench_cli

    monkeypatch.setattr(bench_cli.subprocess, "run", _no_suite_may_run)
    a_file = tmp_path / "results.csv"
    a_file.write_text("")
    assert run(["reduce"], a_file) == 2
    assert run(["reduce"], a_file / "below") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"fastpar bench --results: cannot create the folder {a_file} (a file is in the way)",
        f"fastpar bench --results: cannot create the folder {a_file / 'below'} (Not a directory)",
    ]


def test_a_results_folder_that_takes_no_file_is_refused_as_training_folders_are(
    read_only_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--results` was checked with os.access, which says yes where only a real write fails (a
    security module's path rules, a full inode table): every suite ran, then none could write
    its CSV. It is probed by creating a file, as the checkpoint and metrics folders are."""
    import fastpar.bench_cli as bench_cli

    monkeypatch.setattr(bench_cli.subprocess, "run", _no_suite_may_run)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # what it says there
    assert run(["reduce"], read_only_folder) == 2
    assert capsys.readouterr().err.startswith(
        f"fastpar bench --results: the folder {read_only_folder} is not writable ("
    )


def test_a_missing_matplotlib_is_refused_before_any_suite_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib the first suite ran for minutes, then plotting raised a traceback."""
    import fastpar.bench_cli as bench_cli

    monkeypatch.setattr(bench_cli.subprocess, "run", _no_suite_may_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where it is not installed
    assert run(["reduce"], tmp_path / "out") == 2
    assert "matplotlib, which is not installed: pip install" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _no_suite_may_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a suite ran")
