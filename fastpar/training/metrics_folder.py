"""A `--metrics` folder across runs, as the checkpoint folder is treated: a new run refuses a
folder holding an earlier run's files (with --overwrite it deletes those files, and only those),
and a resumed run keeps the rows of the steps before its checkpoint and drops the others, which
it trains again (TensorBoard is told the same by a restart event: `MetricsWriter`).

Without this, a new run's event files would sit beside the earlier run's and TensorBoard would
draw both as one run, and a resumed run would write the steps between the checkpoint and the
failure twice.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastpar._machine import output_folder_problem

EVENT_FILES = "events.out.tfevents.*"
RUN_FILES = ("steps.csv", "ranks.csv", "validation.csv", "metrics.png")


class MetricsFolderError(RuntimeError):
    """An unusable --metrics folder; the message is one line that says what to do."""


def earlier_run_files(directory: Path) -> list[Path]:
    """The files a run of `fastpar train --metrics` wrote into `directory` (none if it does not
    exist)."""
    if not directory.is_dir():
        return []
    named = [directory / name for name in RUN_FILES if (directory / name).exists()]
    return sorted([*directory.glob(EVENT_FILES), *named])


def files_to_replace(directory: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Check `directory` before any rank starts; the earlier run's files a new run with
    `overwrite` deletes (`delete_files`, once the checkpoint folder has been checked too).

    Raises:
        MetricsFolderError: `directory` is not a folder, cannot be created or written, or a new
            run without `overwrite` would write beside an earlier run's files.
    """
    problem = output_folder_problem(directory, "--metrics", "metrics")
    if problem is not None:
        raise MetricsFolderError(problem)
    found = earlier_run_files(directory)
    if resume or not found:
        return []
    if not overwrite:
        names = ", ".join(sorted({_kind(path) for path in found}))
        raise MetricsFolderError(
            f"metrics folder {directory} already holds an earlier run's metrics ({names}); pass "
            "--resume to continue that run, --overwrite to delete them and start over, or "
            "choose another --metrics folder"
        )
    return found


def check_columns(directory: Path, columns: Mapping[str, Sequence[str]]) -> None:
    """Before a resumed run appends to the CSV files in `directory`: each must have the columns
    this version writes (`columns`: file name -> columns), or its rows would sit under another
    header.

    Raises:
        MetricsFolderError: a file's header names other columns (another version wrote it).
    """
    for name, expected in columns.items():
        path = directory / name
        if not path.exists():
            continue
        with open(path, newline="") as file:
            line = file.readline()
        if not line.endswith("\n"):  # cut short by a killed run: the writer starts it anew
            continue
        found = next(csv.reader([line]))
        if found != list(expected):
            raise MetricsFolderError(
                f"metrics folder {directory}: {name} has the columns {','.join(found)}, not "
                f"{','.join(expected)} as this version of fastpar writes them; resume with "
                "another --metrics folder"
            )


def delete_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _kind(path: Path) -> str:
    return "TensorBoard events" if path.name.startswith("events.out.tfevents.") else path.name


def keep_rows(path: Path, keep: int, *, inclusive: bool = False) -> list[dict[str, str]]:
    """Rewrite the CSV file `path` (if it exists) with only its complete rows whose step is below
    `keep` (`inclusive`: at most `keep`); returns those rows. A file without its header line is
    removed (the writer starts it anew). The file is replaced atomically, so a failure leaves
    the old or the new file, never a part."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames
        headed = columns is not None and "step" in columns
        rows = [row for row in reader if _before(row, keep, inclusive)] if headed else []
    if not headed:
        path.unlink()
        return []
    staging = path.with_name(f".{path.name}.staging")
    with open(staging, "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(staging, path)
    return rows


def _before(row: dict[str, str], keep: int, inclusive: bool) -> bool:
    """Whether `row` is complete (not a line a killed run cut short) and its step is before
    `keep` (or at it, `inclusive`)."""
    if None in row.values() or None in row:  # too few fields, or too many
        return False
    try:
        step = int(row["step"])
    except ValueError:
        return False
    return step < keep or (inclusive and step == keep)
