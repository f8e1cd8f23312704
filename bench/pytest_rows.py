"""A pytest plugin that appends one CSV row per test as soon as the test ends, so a run killed by
a timeout still says what passed, what failed and which test was running.

    FASTPAR_TEST_ROWS=results/tests.csv python -m pytest -p pytest_rows ...   (bench/ on sys.path)

Columns: case (node id), module, status (passed, failed, error, skipped), seconds, error (the
failure's last line, or the skip reason). The test in progress is named in `<csv>.running`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HEADERS = ("case", "module", "status", "seconds", "error")


def _log():
    path = os.environ.get("FASTPAR_TEST_ROWS")
    if not path:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RowLog

    return RowLog(Path(path), HEADERS)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    log = _log()
    if log is not None:
        log.begin(nodeid)


def _reason(report: pytest.BaseReport) -> str:
    """The skip reason, or the exception's first line (type and message)."""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", "") or getattr(report, "longreprtext", "") or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    error_lines = [line.removeprefix("E ").strip() for line in lines if line.startswith("E ")]
    return (error_lines or lines or [""])[0][:300]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One row per test: its call's outcome, or the setup/teardown that failed or skipped."""
    log = _log()
    if log is None:
        return
    status = None
    if report.when == "call":
        status = "failed" if report.failed else ("skipped" if report.skipped else "passed")
    elif report.failed:
        status = "error"  # setup or teardown raised
    elif report.skipped and report.when == "setup":
        status = "skipped"
    if status is None:
        return
    log.write({
        "case": report.nodeid + (f" [{report.when}]" if report.when == "teardown" else ""),
        "module": report.nodeid.split("::")[0],
        "status": status,
        "seconds": round(report.duration, 3),
        "error": "" if status == "passed" else _reason(report),
    })  # fmt: skip


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module that cannot be collected (an import error) is a row, not a silent gap."""
    log = _log()
    if log is not None and report.failed:
        log.write({"case": f"{report.nodeid} [collect]", "module": report.nodeid,
                   "status": "error", "error": _reason(report)})  # fmt: skip
