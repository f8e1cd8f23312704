"""`fastpar train --metrics DIR`: TensorBoard events, CSV and a PNG with the series of each
layout; the blocks recorded are the blocks trained on, and a one-process slicer fed the recorded
measurements decides the same blocks; nothing is written without --metrics."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from fastpar.data import DynamicSlicer
from fastpar.training import loop
from fastpar.training.batches import dynamic_options
from fastpar.training.cli import prepare
from fastpar.training.config import TrainConfig
from fastpar.training.faults import KILL_ENV, SLOW_ENV
from fastpar.training.metrics import ROW
from fastpar.training.metrics_files import CSV_COLUMNS, RANK_COLUMNS, STEP_COLUMNS, Series
from fastpar.training.metrics_folder import (
    MetricsFolderError,
    check_columns,
    files_to_replace,
    keep_rows,
)
from fastpar.training.metrics_plot import plot_run
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
    return _run_with_output(tmp, steps, *args, env=env)[0]


def _run_with_output(
    tmp: Path, steps: int, *args: str, env: dict[str, str] | None = None
) -> tuple[Path, str]:
    """The metrics folder of a run with --metrics, and what the run printed (stdout)."""
    folder = tmp / "metrics"
    result = _train(tmp / "ckpt", "--steps", str(steps), "--checkpoint-every", "4",
                    "--log-every", "3", "--metrics", str(folder), *args, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"metrics: {folder}" in result.stdout
    assert (folder / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return folder, result.stdout


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
    """Also the progress line of dp+pp, which shows the layout's numbers (exposed
    communication, bubble)."""
    layouts = [("pp", ("--nproc", "2", "--parallel", "pp"), 2),
               ("dp+pp", ("--nproc", "4", "--parallel", "dp+pp"), 4)]  # fmt: skip
    for name, args, world_size in layouts:
        steps = 5
        folder, stdout = _run_with_output(tmp_path / name.replace("+", "_"), steps, *args)
        if name == "dp+pp":
            line = stdout.splitlines()[0]
            assert "exposed comm " in line and " %" in line and "bubble 0." in line, line
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


def test_a_resumed_run_continues_the_metrics_of_the_run_it_resumes(tmp_path: Path) -> None:
    steps, folder = 10, tmp_path / "metrics"
    options = ("--nproc", "2", "--steps", str(steps), "--checkpoint-every", "4", "--log-every",
               "3", "--metrics", str(folder))  # fmt: skip
    # Rank 1 dies at step 6. The checkpoint at 4 survives, and with it the metrics of steps 0-2
    # (a window) and 3 (the checkpoint closes a window), flushed with it; steps 4-5 (a window)
    # may be on disk too, depending on when the launcher stopped rank 0.
    failed = _train(tmp_path / "ckpt", *options, env={KILL_ENV: "1:6"})
    assert failed.returncode == 1, failed.stderr[-3000:]
    before = _csv(folder / "steps.csv")
    assert [int(r["step"]) for r in before] in (list(range(4)), list(range(6)))
    result = _train(tmp_path / "ckpt", *options, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 4" in result.stdout
    # Every step once (steps 4 and 5 trained again replace the failed run's), in both the CSV
    # files and what TensorBoard shows; the validation at the checkpoint stays.
    scalars = _check_common(folder, steps, world_size=2)
    assert [int(r["step"]) for r in _csv(folder / "validation.csv")] == [4, 8, 10]
    assert _csv(folder / "steps.csv")[:4] == before[:4]
    train_loss = dict(scalars["loss/train"])
    kept_loss = [float(row["loss"]) for row in before[:4]]
    assert [train_loss[s] for s in range(4)] == pytest.approx(kept_loss)


def test_the_rows_before_a_checkpoint_are_on_disk_when_it_is_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank stopped right after checkpoint S was sealed (while rank 0 validated, say) left the
    rows before S in rank 0's buffers; a resume from S keeps the rows before S from the files,
    so those were lost for good. A one-rank run in this process: what the files hold at each
    seal."""
    folder = tmp_path / "metrics"
    config = TrainConfig(embed=8, hidden=16, layers=1, seq_len=16, batch_size=4,
                         train_bytes=40_000, validation_bytes=4_000, validation_batches=2,
                         sample_bytes=16, backend="torch", steps=4, checkpoint_every=2,
                         log_every=3, nproc=1, checkpoint_dir=tmp_path / "ckpt",
                         metrics_dir=folder)  # fmt: skip
    on_disk: dict[int, tuple[list[int], list[int]]] = {}
    save = loop.save_checkpoint

    def save_and_look(config: TrainConfig, step: int, *args: object) -> Path:
        sealed = save(config, step, *args)
        on_disk[step] = tuple(sorted({int(row["step"]) for row in _csv(folder / name)})
                              for name in ("steps.csv", "ranks.csv"))  # fmt: skip
        return sealed

    monkeypatch.setattr(loop, "save_checkpoint", save_and_look)
    assert prepare(config) is None  # a new run: creates the folders
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        loop.train_rank(config)
    finally:
        dist.destroy_process_group()
    # Checkpoint 2 closes the window of steps 0-1; checkpoint 4 the one of step 3, after the
    # progress line's window of step 2.
    assert on_disk == {2: ([0, 1], [0, 1]), 4: ([0, 1, 2, 3], [0, 1, 2, 3])}


def test_a_new_run_keeps_off_an_earlier_runs_metrics_unless_told_to_overwrite(
    tmp_path: Path,
) -> None:
    folder = _run(tmp_path / "first", 4, "--nproc", "1")
    events = sorted(folder.glob("events.out.tfevents.*"))
    kept = folder / "notes.txt"  # not the run's: --overwrite leaves it
    kept.write_text("mine")
    refused = _train(tmp_path / "second", "--nproc", "1", "--steps", "3", "--metrics", str(folder))
    assert refused.returncode == 1
    assert "already holds an earlier run's metrics" in refused.stderr, refused.stderr
    assert sorted(folder.glob("events.out.tfevents.*")) == events
    assert not (tmp_path / "second").exists()  # refused before the checkpoint folder was made
    again = _train(tmp_path / "third", "--nproc", "1", "--steps", "3", "--log-every", "1",
                   "--metrics", str(folder), "--overwrite")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert not set(events) & set(folder.glob("events.out.tfevents.*"))
    _check_common(folder, 3, world_size=1)
    assert kept.read_text() == "mine"


def test_metrics_folder_checks(tmp_path: Path) -> None:
    not_folder = tmp_path / "file"
    not_folder.write_text("")
    with pytest.raises(MetricsFolderError, match="is not a folder"):
        files_to_replace(not_folder, resume=False, overwrite=True)
    run_files = [tmp_path / "steps.csv", tmp_path / "events.out.tfevents.1.host.2.0"]
    for path in run_files:
        path.write_text("")
    (tmp_path / "other.csv").write_text("")
    assert files_to_replace(tmp_path, resume=True, overwrite=False) == []
    assert files_to_replace(tmp_path, resume=False, overwrite=True) == sorted(run_files)
    assert files_to_replace(tmp_path / "new", resume=False, overwrite=False) == []
    assert (tmp_path / "new").is_dir()


def test_a_read_only_metrics_folder_is_refused(read_only_folder: Path) -> None:
    with pytest.raises(MetricsFolderError, match=r"cannot write into metrics folder .*\("):
        files_to_replace(read_only_folder, resume=False, overwrite=False)


def test_a_resume_keeps_the_complete_rows_before_its_step(tmp_path: Path) -> None:
    path = tmp_path / "validation.csv"
    lines = ["step,validation_loss", *(f"{step},{step / 10}" for step in range(6)), "1"]
    path.write_text("\n".join(lines))  # the last line cut short by a killed run
    assert [row["step"] for row in keep_rows(path, 4)] == ["0", "1", "2", "3"]
    assert [row["step"] for row in _csv(path)] == ["0", "1", "2", "3"]
    assert [row["step"] for row in keep_rows(path, 3, inclusive=True)] == ["0", "1", "2", "3"]
    for cut in ("", "ste"):  # a file a killed run left without its whole header
        path.write_text(cut)
        assert keep_rows(path, 4) == [] and not path.exists()


def test_a_resume_refuses_csv_files_with_other_columns(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    config = TrainConfig(checkpoint_dir=tmp_path / "ckpt", metrics_dir=folder, resume=True)
    (folder / "steps.csv").write_text(",".join(STEP_COLUMNS) + "\r\n0,2.0\r\n")
    (folder / "validation.csv").write_text("ste")  # a header cut short: started anew
    check_columns(folder, CSV_COLUMNS)
    (folder / "steps.csv").write_text("step,loss,tokens_per_s\r\n0,2.0,1.0\r\n")
    with pytest.raises(MetricsFolderError, match=r"steps.csv has the columns step,loss,tokens_"):
        prepare(config)  # before it looks for a checkpoint to resume


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


def test_the_picture_of_a_run_resumed_on_another_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.axes import Axes

    # Fixed slicing, then 2 replicas, then (resumed) 3: a line per replica, each with a gap
    # where it did not run.
    blocks = ["", "", "16/16", "18/14", "11/11/10", "12/10/10"]
    rows = [{"step": str(step), "loss": "2.0", "tokens_per_s": "1.0", "blocks": b,
             "decision": "grow" if b else "", "exposed_comm": "0.1", "bubble": "0"}
            for step, b in enumerate(blocks)]  # fmt: skip
    series = Series.from_rows(rows, [{"step": "4", "validation_loss": "2.1"}])
    drawn: list[list[float]] = []
    draw = Axes.step
    monkeypatch.setattr(
        Axes, "step", lambda ax, x, y, *a, **k: drawn.append(y) or draw(ax, x, y, *a, **k)
    )
    path = tmp_path / "metrics.png"
    plot_run(series, ParallelDims(dp=3, pp=1, world_size=3), "resumed", path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gaps = [[None if math.isnan(v) else v for v in line] for line in drawn]
    assert gaps == [
        [None, None, 16, 18, 11, 12],
        [None, None, 16, 14, 11, 10],
        [None] * 4 + [10, 10],
    ]


def test_a_flush_syncs_the_csv_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's files are synced, so the rows before it must be too: a resumed run keeps
    them from the files and never writes them again, even after the machine failed."""
    import os

    from fastpar.training import metrics_files

    writer = metrics_files.MetricsWriter(tmp_path, ParallelDims(dp=1, pp=1, world_size=1), 8, "t")
    synced: set[str] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(metrics_files.os, "fsync", recording_fsync)
    writer.flush()
    monkeypatch.undo()
    writer.close()
    assert {"steps.csv", "ranks.csv", "validation.csv"} <= synced
