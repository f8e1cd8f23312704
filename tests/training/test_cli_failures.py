"""`fastpar train` when something is wrong: one line that names the file and what to do, a
non-zero exit, no traceback, and no checkpoint lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastpar import launch
from fastpar.training import checkpoint
from fastpar.training.checkpoint import find_intact, step_name
from fastpar.training.cli import _resume_hint, run
from fastpar.training.config import MAX_SEED, TrainConfig
from tests.processes import children, session_processes

from .util import REPO, SMALL
from .util import train_cli as _train


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fastpar train: ")]


def _fake_run(root: Path, *steps: int) -> None:
    """Checkpoints of another run (any tensors do: these runs must not read them)."""
    for step in steps:
        checkpoint.save(root, step, {"model.x": torch.ones(3)}, {"run": "older"})


def test_a_fresh_run_never_deletes_an_older_runs_checkpoints(tmp_path: Path) -> None:
    _fake_run(tmp_path, 100, 200)
    result = _train(tmp_path, "--nproc", "1", "--steps", "2", timeout=60)
    assert result.returncode == 1
    assert _errors(result) == [
        f"fastpar train: checkpoint folder {tmp_path} already holds checkpoints (newest: "
        f"{step_name(200)}); pass --resume to continue that run, --overwrite to delete them and "
        "start over, or choose another --checkpoint-dir"
    ]
    assert "Traceback" not in result.stderr
    assert checkpoint.list_steps(tmp_path) == [100, 200]

    result = _train(tmp_path, "--nproc", "1", "--steps", "4", "--checkpoint-every", "2",
                    "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.list_steps(tmp_path) == [2, 4]
    assert (tmp_path / checkpoint.LATEST).read_text() == step_name(4)
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 4 and not notes


def test_resume_of_a_missing_folder_fails_in_one_line(tmp_path: Path) -> None:
    result = _train(tmp_path / "typo", "--nproc", "1", "--steps", "2", "--resume", timeout=60)
    assert result.returncode == 1
    assert _errors(result) == [
        f"fastpar train: --resume: checkpoint folder {tmp_path / 'typo'} does not exist; check "
        "--checkpoint-dir, or drop --resume to start a new run"
    ]
    assert not (tmp_path / "typo").exists()


def test_resume_of_a_run_already_past_steps_fails_in_one_line(tmp_path: Path) -> None:
    _fake_run(tmp_path, 40)
    result = _train(tmp_path, "--nproc", "1", "--steps", "30", "--resume", timeout=60)
    assert result.returncode == 1
    assert _errors(result) == [
        f"fastpar train: --resume: checkpoint {tmp_path / step_name(40)} is at step 40, which "
        "already reaches --steps 30; raise --steps to train further"
    ]


def test_a_read_only_folder_fails_at_start(read_only_folder: Path) -> None:
    start = time.monotonic()
    result = _train(read_only_folder, "--nproc", "1", "--steps", "2", timeout=60)
    assert result.returncode == 1
    (line,) = _errors(result)
    assert line.startswith(f"fastpar train: checkpoint folder {read_only_folder} is not writable")
    assert "Traceback" not in result.stderr and "step 1/" not in result.stdout
    assert time.monotonic() - start < 30


def test_resume_passes_over_a_corrupt_newest_checkpoint(tmp_path: Path) -> None:
    common = ("--nproc", "1", "--checkpoint-every", "2")
    assert _train(tmp_path, *common, "--steps", "4").returncode == 0
    damaged = tmp_path / step_name(4) / "__0_0.distcp"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = _train(tmp_path, *common, "--steps", "6", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _errors(result) == [
        f"fastpar train: skipped checkpoint {tmp_path / step_name(4)}: file __0_0.distcp is "
        f"truncated (100 bytes, expected {size})"
    ]
    assert "resumed from step 2" in result.stdout
    assert checkpoint.list_steps(tmp_path) == [4, 6]  # step 4 rewritten, then 6
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 6 and not notes

    # A failure inside the ranks: one line naming the checkpoint and what to do; --debug adds
    # the traceback. The checkpoints stay as they were.
    mismatch = _train(tmp_path, *common, "--steps", "8", "--resume", "--hidden", "32")
    assert mismatch.returncode == 1
    assert (
        f"rank 0: CheckpointError: checkpoint {tmp_path / step_name(6)} was written with "
        "--hidden 16; this run has --hidden 32: resume with the same value" in mismatch.stderr
    )
    assert "Traceback" not in mismatch.stderr and "--debug shows the tracebacks" in mismatch.stderr
    debug = _train(tmp_path, *common, "--steps", "8", "--resume", "--hidden", "32", "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert checkpoint.list_steps(tmp_path) == [4, 6]


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c_when(ready: Callable[[int], bool], *args: str, limit_s: float) -> tuple[int, str]:
    """Start `fastpar train` on 2 ranks with `args`, press Ctrl-C once `ready(launcher pid)`
    (within `limit_s`), and return its exit code and stderr, once no process it started is
    left (multiprocessing's helper may take a moment to notice)."""
    command = [sys.executable, "-m", "fastpar", "train", *SMALL, "--nproc", "2",
               "--steps", "100000", *args]  # fmt: skip
    # A session of its own: the signal goes to the whole group, as a terminal's Ctrl-C does.
    # SIGINT at its default, as in a terminal: a job started in the background by a
    # non-interactive shell (a CI script's `cmd &`) inherits it ignored, and so would this one.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=_sigint_as_in_a_terminal)  # fmt: skip
    try:
        deadline = time.monotonic() + limit_s
        while not ready(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, "not ready in time"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    deadline = time.monotonic() + 10
    while (left := session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left
    return process.returncode, stderr


def test_ctrl_c_stops_every_rank_and_says_how_to_resume(tmp_path: Path) -> None:
    code, stderr = _ctrl_c_when(lambda _: find_intact(tmp_path)[0] is not None,
                                "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "2",
                                "--comm", "torch", limit_s=120)  # fmt: skip
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("fastpar train: ")]
    assert line.startswith("fastpar train: interrupted; all ranks were stopped; rerun with "
                           "--resume to continue from step ")  # fmt: skip


def _fork_server_importing_torch(launcher: int) -> bool:
    """Whether `launcher`'s fork server is running and has begun to import torch (its preload,
    seconds long, goes on after that)."""
    for pid, args in children(launcher):
        if "multiprocessing.forkserver" in args:
            with contextlib.suppress(OSError):  # it may have ended
                return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return False


def test_ctrl_c_while_the_ranks_start_says_one_line(tmp_path: Path) -> None:
    """Ctrl-C while the fork server imports torch (the ranks are not forked yet): the
    launcher's one line and exit code, no KeyboardInterrupt traceback, no process left. (That
    the server ignores SIGINT from its start is tests/test_launch_start.py's.)"""
    code, stderr = _ctrl_c_when(_fork_server_importing_torch, "--checkpoint-dir", str(tmp_path),
                                limit_s=60)  # fmt: skip
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    said = "fastpar train: interrupted; all ranks were stopped; no checkpoint was written yet."
    assert said in stderr.splitlines(), stderr


class _SigtermEscaped(Exception):
    pass


def _sigterm_escaped(signum: int, frame: object) -> None:
    raise _SigtermEscaped


def test_sigterm_stops_every_rank_and_says_how_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kill`, `timeout` or a scheduler's time limit send the launcher SIGTERM: it must stop the
    ranks and say how to resume, as on Ctrl-C (it died without a word). In this process: the
    launch is replaced by one that receives SIGTERM while the ranks train."""

    def terminated_while_training(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler runs as the signal arrives
        raise AssertionError("SIGTERM did not reach the launcher")

    monkeypatch.setattr(launch, "spawn_ranks", terminated_while_training)
    # Without the launcher's own handler, SIGTERM fails this test instead of killing pytest.
    previous = signal.signal(signal.SIGTERM, _sigterm_escaped)
    try:
        code = run(TrainConfig(checkpoint_dir=tmp_path))
        assert signal.getsignal(signal.SIGTERM) is _sigterm_escaped  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == (
        "fastpar train: terminated (SIGTERM); all ranks were stopped; no checkpoint was written "
        "yet."
    )


def test_a_failed_save_says_where_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A save that failed (a full disk) leaves the checkpoints before it, and the user must learn
    which step --resume continues from, as after any other failure. In this process: the launch
    is replaced by the failure the ranks report."""
    _fake_run(tmp_path, 2)
    error = (f"CheckpointError: could not write checkpoint {tmp_path / step_name(4)}: rank 0: "
             "OSError: [Errno 28] No space left on device")  # fmt: skip

    def save_failed(*args: object, **kwargs: object) -> None:
        raise launch.RankFailure("tracebacks", f"rank 0: {error}\nrank 1: {error}")

    monkeypatch.setattr(launch, "spawn_ranks", save_failed)
    # --resume: a new run would refuse a folder that holds a checkpoint.
    assert run(TrainConfig(checkpoint_dir=tmp_path, resume=True, steps=8)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        f"ranks 0, 1: {error}",
        "the other ranks were stopped; rerun with --resume to continue from step 2; --debug "
        "shows the tracebacks.",
    ]


def test_a_run_stopped_after_its_last_checkpoint_is_not_sent_to_resume(tmp_path: Path) -> None:
    """Ctrl-C while rank 0 writes the final sample came with "rerun with --resume to continue
    from step 4", which --resume then refused: step 4 already reaches --steps 4."""
    _fake_run(tmp_path, 4)
    assert _resume_hint(TrainConfig(checkpoint_dir=tmp_path, steps=4)) == (
        f"training had reached --steps 4: checkpoint {tmp_path / step_name(4)} holds the trained "
        "model"
    )
    hint = _resume_hint(TrainConfig(checkpoint_dir=tmp_path, steps=6))
    assert hint == "rerun with --resume to continue from step 4"


def test_config_takes_no_bool_for_a_number() -> None:
    with pytest.raises(TypeError, match=r"--nproc must be an integer, got bool True"):
        TrainConfig(nproc=True)
    with pytest.raises(TypeError, match=r"--lr must be a number, got bool True"):
        TrainConfig(lr=True)
    with pytest.raises(ValueError, match=r"--steps must be an integer >= 1, got 0"):
        TrainConfig(steps=0)


def test_a_seed_beyond_32_bits_is_refused_before_any_rank_starts() -> None:
    """--seed 2**64 passed the checks and crashed every rank in build_model (OverflowError);
    the largest seed accepted builds the model and shuffles its epochs."""
    from fastpar.data import FixedSlicer
    from fastpar.training.model import build_model

    for seed in (2**32, 2**64):
        with pytest.raises(ValueError, match=rf"--seed must be an integer in \[0, {MAX_SEED}\], "
                           rf"got {seed}"):  # fmt: skip
            TrainConfig(seed=seed)
    config = TrainConfig(seed=MAX_SEED, embed=4, hidden=8, layers=1)
    build_model(vocab=256, embed=config.embed, hidden=config.hidden, layers=config.layers,
                backend="torch", seed=config.seed)  # fmt: skip
    slicer = FixedSlicer(64, 4, drop_last=True, shuffle=True, seed=config.seed)
    slicer.set_epoch(10**6)
    assert sorted(i for b in range(4) for i in slicer.block(b)) == list(range(64))


def test_a_validation_text_shorter_than_a_window_is_refused() -> None:
    """A window is --seq-len inputs and one more target byte; with none, the run reported
    "validation loss: nan" at its end."""
    TrainConfig(seq_len=16, validation_bytes=17)
    with pytest.raises(ValueError, match="--validation-bytes 16 holds no window of --seq-len 16"):
        TrainConfig(seq_len=16, validation_bytes=16)


def _no_rank_may_start(*args: object, **kwargs: object) -> None:
    raise AssertionError("a rank started")


def _profile_refusal(
    tmp_path: Path,
    profile: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """The error line of `fastpar train --profile <profile>`, which must stop it as it reads
    its options."""
    from fastpar.__main__ import main

    monkeypatch.setattr(launch, "spawn_ranks", _no_rank_may_start)
    command = ["train", *SMALL, "--nproc", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--profile", str(profile)])
    assert stopped.value.code == 2
    assert not (tmp_path / "ckpt").exists()  # nothing was prepared
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("missing", [["matplotlib"], ["tensorboard", "matplotlib"]])
def test_metrics_without_their_packages_are_refused_before_any_rank_starts(
    missing: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fastpar.__main__ import main

    for name in missing:  # as where it is not installed: neither imported nor found
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(launch, "spawn_ranks", _no_rank_may_start)
    command = ["train", *SMALL, "--nproc", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--metrics", str(tmp_path / "metrics")])
    assert stopped.value.code == 2
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "metrics").exists()
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"fastpar train: error: --metrics needs {' and '.join(missing)}: pip install "
        "'fastpar[metrics]'"
    )


def test_a_profile_path_naming_a_file_is_refused_before_any_rank_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--profile trace.json` naming a file failed inside every rank with a FileExistsError."""
    trace = tmp_path / "trace.json"
    trace.write_text("")
    assert _profile_refusal(tmp_path, trace, monkeypatch, capsys) == (
        f"fastpar train: error: --profile {trace} is not a folder"
    )
    assert _profile_refusal(tmp_path, trace / "below", monkeypatch, capsys) == (
        f"fastpar train: error: cannot write into profile folder {trace / 'below'} (Not a "
        "directory); fix its permissions or choose another --profile folder"
    )


def test_a_profile_folder_that_takes_no_file_is_refused_before_any_rank_starts(
    tmp_path: Path,
    read_only_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """torch's trace export logged "Failed to write to log file!" after the profiled steps, and
    the run ended with success and no trace."""
    line = _profile_refusal(tmp_path, read_only_folder, monkeypatch, capsys)
    assert line.startswith(
        f"fastpar train: error: cannot write into profile folder {read_only_folder} ("
    )
