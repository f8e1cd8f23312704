"""`fastpar train` end to end on CPU: the parallel layouts train the same model, a killed rank
stops the run with an error naming it, and --resume continues to the same parameters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastpar.training.checkpoint import JOB, find_intact, read_tensors, step_name

from .util import REPO, SMALL
from .util import train_cli as _train


def _parameters(root: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The whole model as a checkpoint holds it (the newest intact one by default)."""
    if step is None:
        found, _ = find_intact(root)
        assert found is not None
        step = found.step
    return read_tensors(root / step_name(step), prefix="model.")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints of the LSTM trained by one process for 4 steps (every 2 steps): the
    model the pipelines of the two tests below must reach, trained once for both."""
    root = tmp_path_factory.mktemp("single")
    result = _train(root, "--steps", "4", "--checkpoint-every", "2", "--nproc", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation loss:" in result.stdout and "sample:" in result.stdout
    return root


def test_layouts_train_the_same_model(tmp_path: Path, single: Path) -> None:
    """pp on 2 stages equals 1 process, and dp+pp (2 replicas x 2 stages) equals dp on 2
    replicas: pipelines and replicas change where the work runs, not the numbers."""
    runs = {
        "pp": ("--nproc", "2", "--parallel", "pp", "--microbatches", "3"),
        "dp": ("--nproc", "2", "--parallel", "dp"),
        "dp+pp": ("--nproc", "4", "--parallel", "dp+pp", "--schedule", "gpipe"),
    }
    for name, args in runs.items():
        result = _train(tmp_path / name, "--steps", "4", "--checkpoint-every", "2", *args)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
        assert "validation loss:" in result.stdout and "sample:" in result.stdout
    _assert_close(_parameters(tmp_path / "pp"), _parameters(single))
    _assert_close(_parameters(tmp_path / "dp+pp"), _parameters(tmp_path / "dp"))
    # Training moved the weights: the comparison above is not between two initial states.
    first, last = _parameters(tmp_path / "dp", 2), _parameters(tmp_path / "dp", 4)
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_every_schedule_and_cell_trains_the_same_model(tmp_path: Path, single: Path) -> None:
    """The schedules with split backwards or two chunks per rank, and the GRU and RNN cells,
    reach the parameters of the same model trained without a pipeline (for the LSTM: the
    `single` run, whose checkpoint at step 2 changes nothing in its training)."""
    pp = ("--nproc", "2", "--parallel", "pp", "--microbatches", "3", "--schedule")
    runs = {
        "lstm-interleaved": (*pp, "interleaved-1f1b"),
        "lstm-zero-bubble": (*pp, "zero-bubble"),
        "gru": ("--nproc", "1", "--cell", "gru"),
        "gru-zbv": (*pp, "zbv", "--cell", "gru"),
        "rnn-dp": ("--nproc", "2", "--parallel", "dp", "--cell", "rnn"),
        "rnn-dp+pp": ("--nproc", "4", "--parallel", "dp+pp", "--schedule", "interleaved-1f1b",
                      "--cell", "rnn"),
    }  # fmt: skip
    for name, args in runs.items():
        result = _train(tmp_path / name, "--steps", "4", "--checkpoint-every", "4", *args)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    roots = {name: tmp_path / name for name in runs} | {"lstm": single}
    for name, same_as in (("lstm-interleaved", "lstm"), ("lstm-zero-bubble", "lstm"),
                          ("gru-zbv", "gru"), ("rnn-dp+pp", "rnn-dp")):  # fmt: skip
        _assert_close(_parameters(roots[name]), _parameters(roots[same_as]))

    # The cells build different models: the runs above compare like with like.
    def shapes(name: str) -> dict[str, torch.Size]:
        return {key: value.shape for key, value in _parameters(roots[name]).items()}

    assert shapes("gru") != shapes("lstm") != shapes("rnn-dp")


def test_measured_stage_cuts_train_the_same_model(tmp_path: Path) -> None:
    """--balance auto: rank 0 times the modules and every rank takes its cuts (the log gives
    them); the pipeline still trains the model one process trains."""
    layers = ("--layers", "3", "--steps", "4", "--checkpoint-every", "4")
    single = _train(tmp_path / "single", "--nproc", "1", *layers)
    auto = _train(tmp_path / "auto", "--nproc", "2", "--parallel", "pp", "--microbatches", "2",
                  "--balance", "auto", *layers)  # fmt: skip
    for result in (single, auto):
        assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"balanced cuts \[\d\]: stage costs \[[\d., ]+\] ms", auto.stderr)
    _assert_close(_parameters(tmp_path / "auto"), _parameters(tmp_path / "single"))


def test_killed_rank_stops_the_run_and_resume_repeats_nothing(tmp_path: Path) -> None:
    common = ("--nproc", "2", "--steps", "6", "--checkpoint-every", "3", "--comm", "ring")
    reference = _train(tmp_path / "whole", *common)
    assert reference.returncode == 0, reference.stderr[-3000:]

    start = time.monotonic()
    killed = _train(tmp_path / "split", *common, env={"FASTPAR_TEST_KILL_AT": "1:4"})
    assert time.monotonic() - start < 180
    assert killed.returncode == 1
    assert "rank 1: died with exit code -9 (SIGKILL)" in killed.stderr
    assert "rerun with --resume to continue from step 3" in killed.stderr
    assert "Traceback" not in killed.stderr  # --debug shows them
    found, _ = find_intact(tmp_path / "split")
    assert found is not None and found.step == 3

    resumed = _train(tmp_path / "split", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in resumed.stdout
    whole = _parameters(tmp_path / "whole")
    split = _parameters(tmp_path / "split")
    for key in whole:
        assert torch.equal(whole[key], split[key]), key

    # Under torchrun --max-restarts the restarted ranks resume by themselves.
    elastic_dir = tmp_path / "elastic"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.5", "-m", "fastpar", "train",
               *SMALL, "--checkpoint-dir", str(elastic_dir), "--steps", "6",
               "--checkpoint-every", "3", "--comm", "ring"]  # fmt: skip
    env = {**os.environ, "FASTPAR_TEST_KILL_AT": "1:4"}
    elastic = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=240,
                             env=env, check=False)  # fmt: skip
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "resumed from step 3" in elastic.stdout
    # One host without --rdzv-endpoint: the job is known by the run id torchrun drew for it.
    assert re.fullmatch(r"rdzv-id [0-9a-f-]{36}", (elastic_dir / JOB).read_text())
    restarted = _parameters(elastic_dir)
    for key in whole:
        assert torch.equal(whole[key], restarted[key]), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--parallel", "mesh"], "argument --parallel: invalid choice: 'mesh'"),
        (["--cell", "lstmx"], "argument --cell: invalid choice: 'lstmx'"),
        (["--parallel", "pp", "--slicing", "loss"], "--slicing loss adapts data-parallel"),
        (["--parallel", "dp+pp", "--nproc", "3"], "multiple of --pp-stages 2"),
        (["--parallel", "pp", "--nproc", "1"], "--parallel pp needs at least 2 ranks, got 1"),
        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
        (["--resume", "--overwrite"], "pass one of them"),
        (
            ["--parallel", "pp", "--nproc", "3", "--schedule", "zbv"],
            "into 6 stages of at least one module each, and the model has 4",
        ),
        (["--parallel", "pp", "--microbatches", "5"], "--microbatches 5 needs --batch-size >= 5"),
        (["--seed", str(2**64)], f"--seed must be an integer in [0, {2**32 - 1}], got {2**64}"),
    ],
)
def test_bad_arguments_are_explained(tmp_path: Path, args: list[str], message: str) -> None:
    result = _train(tmp_path, *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_every_option_is_explained_with_its_default() -> None:
    result = subprocess.run([sys.executable, "-m", "fastpar", "train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    # An option's lines run until the next option: each holds a text, and a value's default.
    entries = re.split(r"\n  (?=-)", result.stdout.split("options:", 1)[1])[1:]
    assert len(entries) > 30
    for entry in entries:
        flag, _, text = entry.partition("  ")
        text = " ".join(text.split())
        assert text, f"{flag.strip()} has no help text"
        takes_value = " " in flag.split(",")[-1].strip() or "{" in flag
        assert not takes_value or "(default: " in text, f"{flag.strip()} shows no default"


def test_profile_writes_a_trace_with_the_executor_phases(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    result = _train(tmp_path / "ckpt", "--nproc", "2", "--steps", "6", "--checkpoint-every", "6",
                    "--comm", "ring", "--profile", str(traces))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        text = (traces / f"trace-rank{rank}.json").read_text()
        for phase in ("fastpar.train.step", "fastpar.dp.forward", "fastpar.dp.allreduce.bucket0",
                      "fastpar.dp.wait", "fastpar.train.optimizer"):  # fmt: skip
            assert f'"{phase}"' in text, (rank, phase)
