"""`fastpar train --metrics DIR`: TensorBoard events, CSV and a PNG with the series of each
layout; the blocks recorded are the blocks trained on, and a one-process slicer fed the recorded
measurements decides the same blocks; nothing is written without --metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fastpar.data import DynamicSlicer
from fastpar.training import loop
from fastpar.training.batches import dynamic_options
from fastpar.training.config import TrainConfig
from fastpar.training.faults import SLOW_ENV
from fastpar.training.metrics import ROW
from fastpar.training.metrics_files import RANK_COLUMNS, STEP_COLUMNS
from fastpar.training.parallel_dims import ParallelDims, RankPlace

from .util import REPO, SMALL
from .util import train_cli as _train


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in `folder`: tag -> [(step, value)]."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}  # fmt: skip


def _run(tmp: Path, steps: int, *args: str, env: dict[str, str] | None = None) -> Path:
    folder = tmp / "metrics"
    result = _train(tmp / "ckpt", "--steps", str(steps), "--checkpoint-every", "4",
                    "--log-every", "3", "--metrics", str(folder), *args, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics: {folder}" in result.stdout
    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return folder


def _check_common(folder: Path, steps: int, world_size: int) -> dict[str, list]:
    step_rows, rank_rows = _csv(folder / "steps.csv"), _csv(folder / "ranks.csv")
    assert tuple(step_rows[0]) == STEP_COLUMNS and tuple(rank_rows[0]) == RANK_COLUMNS
    assert [int(r["step"]) for r in step_rows] == list(range(steps))
    assert [(int(r["step"]), int(r["rank"])) for r in rank_rows] == [
        (s, r) for s in range(steps) for r in range(world_size)
    ]
    for row in rank_rows:
        assert 0 <= float(row["compute_s"]) <= float(row["step_s"]), row
        assert 0 <= float(row["bubble"]) < 1, row
    # Validation between checkpoints (every 4 steps) where rank 0 holds the model, and at the end.
    validation = [int(r["step"]) for r in _csv(folder / "validation.csv")]
    assert validation[-1] == steps
    scalars = _scalars(folder)
    for tag in ("loss/train", "throughput/tokens_per_s", "time/step_s"):
        assert [s for s, _ in scalars[tag]] == list(range(steps)), tag
    assert [s for s, _ in scalars["loss/validation"]] == validation
    return scalars


def test_dp_with_throughput_slicing_records_the_blocks_it_trained_on(tmp_path: Path) -> None:
    steps = 14
    # Rank 1 becomes a straggler at step 3 and recovers at step 9.
    folder = _run(tmp_path, steps, "--nproc", "2", "--slicing", "throughput",
                  env={SLOW_ENV: "1:3:9:4"})  # fmt: skip
    scalars = _check_common(folder, steps, world_size=2)
    assert [int(r["step"]) for r in _csv(folder / "validation.csv")] == [4, 8, 12, 14]
    for tag in ("slicing/block/replica", "slicing/samples_per_s/replica", "dp/exposed_comm/rank",
                "dp/allreduce_s/rank"):  # fmt: skip
        for index in range(2):
            assert len(scalars[f"{tag}{index}"]) == steps, tag
    assert not any(tag.startswith("pp/") for tag in scalars)

    rank_rows = _csv(folder / "ranks.csv")
    step_rows = _csv(folder / "steps.csv")
    config = TrainConfig(batch_size=4, slicing="throughput")  # the run's (SMALL) options
    replay = DynamicSlicer(10**6, world_size=2, **dynamic_options(config, 2))
    for step in range(steps):
        rows = rank_rows[2 * step : 2 * step + 2]
        trained = [int(float(r["samples"])) for r in rows]  # what each rank reported
        # The blocks the slicer cut (rank 0's record) are those every rank trained on ...
        assert [int(r["block"]) for r in rows] == trained
        assert step_rows[step]["blocks"] == "/".join(map(str, trained))
        assert sum(trained) == 8 == int(float(rows[0]["global_samples"]))
        # ... and a one-process slicer fed the recorded measurements decides the same blocks.
        assert [len(b) for b in replay.next_step()] == trained, step
        replay.record_all(trained, [float(r["compute_s"]) for r in rows])
        assert step_rows[step]["decision"] in ("rebalance", "hold")


def test_pipeline_layouts_record_bubble_and_stage_compute(tmp_path: Path) -> None:
    layouts = [("pp", ("--nproc", "2", "--parallel", "pp"), 2),
               ("dp+pp", ("--nproc", "4", "--parallel", "dp+pp"), 4)]  # fmt: skip
    for name, args, world_size in layouts:
        steps = 5
        folder = _run(tmp_path / name.replace("+", "_"), steps, *args)
        scalars = _check_common(folder, steps, world_size)
        # Rank 0 holds one stage only: validation at the end alone.
        assert [int(r["step"]) for r in _csv(folder / "validation.csv")] == [steps]
        for rank in range(world_size):
            assert len(scalars[f"pp/bubble/rank{rank}"]) == steps
            assert len(scalars[f"pp/compute_s/rank{rank}"]) == steps
            assert (f"dp/exposed_comm/rank{rank}" in scalars) == (name == "dp+pp")
        assert not any(tag.startswith("slicing/") for tag in scalars)
        for row in _csv(folder / "ranks.csv"):
            assert float(row["forward_s"]) > 0 and float(row["backward_s"]) > 0, row
            # The loss is computed on the last stage only.
            last = int(row["stage"]) == 1
            assert (row["loss"] != "nan") == last, row


def test_progress_line_shows_the_layouts_numbers(tmp_path: Path) -> None:
    result = _train(tmp_path / "ckpt", "--nproc", "4", "--parallel", "dp+pp", "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.splitlines()[0]
    assert "exposed comm " in line and " %" in line and "bubble 0." in line, line


def test_nothing_is_written_without_metrics(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fastpar", "train", *SMALL, "--nproc", "2", "--steps", "2",
               "--slicing", "throughput", "--checkpoint-dir", "ckpt"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=240, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "blocks " in result.stdout and "metrics:" not in result.stdout
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(p.startswith("ckpt/") for p in written), written
    assert not any(p.endswith((".csv", ".png")) or "tfevents" in p for p in written), written


def test_row_fields_are_the_csv_columns() -> None:
    assert set(ROW) <= set(RANK_COLUMNS)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_cell_reaches_the_model_builder(monkeypatch: pytest.MonkeyPatch, cell: str) -> None:
    seen: dict[str, object] = {}

    def fake_build_model(**kwargs: object) -> nn.Sequential:
        seen.update(kwargs)
        return nn.Sequential(nn.Linear(2, 2))

    monkeypatch.setattr(loop, "build_model", fake_build_model)
    dims = ParallelDims(dp=1, pp=1, world_size=1)
    place = RankPlace(dims=dims, rank=0, replica=0, stage=0, dp_group=None, pp_group=None)
    loop.build_stage(TrainConfig(cell=cell), place, torch.device("cpu"))
    assert seen.get("cell", "lstm") == cell


def test_a_bad_cell_is_named() -> None:
    with pytest.raises(ValueError, match=r"--cell must be one of \('lstm', 'gru', 'rnn'\)"):
        TrainConfig(cell="GRU")  # type: ignore[arg-type]
