"""Checkpoint integrity and safe writes, in this process (no process group): what is kept, what
is skipped on resume and why, and what a planted symlink or an unusable folder does."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastpar.training import checkpoint
from fastpar.training.batches import Batches
from fastpar.training.checkpoint import (
    CheckpointError,
    Found,
    check_folder,
    find_intact,
    step_name,
)
from fastpar.training.cli import prepare, restarted_config, run
from fastpar.training.config import TrainConfig
from fastpar.training.loop import Stage, build_stage
from fastpar.training.metrics_folder import MetricsFolderError
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import check_options, restore, save_checkpoint


def _save(root: Path, step: int, keep: int = 2) -> dict[str, torch.Tensor]:
    """A checkpoint of random tensors (fresh each call), returned for comparison."""
    state = {"model.weight": torch.randn(5, 3), "optimizer.state.weight.step": torch.tensor(3.0)}
    checkpoint.save(root, step, {k: v.clone() for k, v in state.items()}, {"note": step},
                    keep=keep)  # fmt: skip
    return state


def test_a_checkpoint_reads_back_equal_and_records_sizes_and_checksums(tmp_path: Path) -> None:
    saved = _save(tmp_path, 7)
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 7 and notes == []
    assert (tmp_path / checkpoint.LATEST).read_text() == step_name(7)
    assert found.manifest["note"] == 7
    files = found.manifest["files"]
    assert ".metadata" in files and any(name.endswith(".distcp") for name in files)
    for name, record in files.items():
        assert (found.directory / name).stat().st_size == record["bytes"]
    loaded = checkpoint.read_tensors(found.directory)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_retention_never_deletes_the_new_checkpoint_or_a_newer_one(tmp_path: Path) -> None:
    """The data-loss case: a folder holding an older, longer run (steps 100 and 200), and a run
    that writes step 2 and then step 4 into it."""
    _save(tmp_path, 100)
    _save(tmp_path, 200)
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    assert checkpoint.list_steps(tmp_path) == [2, 4, 100, 200]  # nothing newer than 4 pruned
    pointed = tmp_path / (tmp_path / checkpoint.LATEST).read_text()
    assert pointed.name == step_name(4) and checkpoint.problem(pointed)[0] is None
    for keep in (1, 3):
        root = tmp_path / f"keep{keep}"
        root.mkdir()
        for step in (1, 2, 3, 4):
            _save(root, step, keep=keep)
        assert checkpoint.list_steps(root) == [1, 2, 3, 4][-keep:]


def test_steps_of_nine_digits_are_found_and_pruned_in_numeric_order(tmp_path: Path) -> None:
    """step-100000000 follows step-99999999 (names of 8 digits or more): it was written but
    never found, `latest` naming it was called corrupt, and retention never reached it."""
    _save(tmp_path, 99_999_999)
    newest = _save(tmp_path, 100_000_000)
    assert checkpoint.list_steps(tmp_path) == [99_999_999, 100_000_000]
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 100_000_000 and notes == []
    assert found.directory.name == step_name(100_000_000) == "step-100000000"
    loaded = checkpoint.read_tensors(found.directory)
    assert all(torch.equal(loaded[key], value) for key, value in newest.items())
    _save(tmp_path, 1_000_000_000)  # keep=2: the oldest goes, by number
    assert checkpoint.list_steps(tmp_path) == [100_000_000, 1_000_000_000]
    with pytest.raises(CheckpointError, match=r"\(newest: step-1000000000\)"):
        check_folder(tmp_path, resume=False, overwrite=False)
    # Only the names step_name writes are steps: a 9-digit name of step 5 is not a second one.
    (tmp_path / "step-000000005").mkdir()
    assert checkpoint.list_steps(tmp_path) == [100_000_000, 1_000_000_000]


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(tmp_path: Path) -> None:
    _save(tmp_path, 100)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(newest: step-0+100\)"):
        check_folder(tmp_path, resume=False, overwrite=False)
    assert checkpoint.list_steps(tmp_path) == [100]
    check_folder(tmp_path, resume=True, overwrite=False)
    check_folder(tmp_path, resume=False, overwrite=True)
    assert checkpoint.list_steps(tmp_path) == [] and not (tmp_path / checkpoint.LATEST).exists()


def test_resume_of_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"--resume: checkpoint folder .*missing.* does not"):
        check_folder(tmp_path / "missing", resume=True, overwrite=False)
    assert not (tmp_path / "missing").exists()


def _truncate(directory: Path) -> None:
    path = directory / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(directory: Path) -> None:
    path = directory / "__0_0.distcp"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(directory: Path) -> None:
    path = directory / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["step"] += 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, r"file __0_0\.distcp is truncated \(\d+ bytes, expected \d+\)"),
        (_flip_a_byte, r"file __0_0\.distcp is corrupt \(SHA-256 mismatch\)"),
        (lambda d: (d / "__0_0.distcp").unlink(), r"file __0_0\.distcp is missing"),
        (lambda d: (d / ".metadata").unlink(), r"file \.metadata is missing"),
        (lambda d: (d / checkpoint.MANIFEST).unlink(), r"fastpar\.json is missing"),
        (_edit_manifest, r"fastpar\.json is corrupt \(checksum mismatch\)"),
        (lambda d: (d / checkpoint.MANIFEST).write_bytes(b"{\x00"), r"fastpar\.json is unreadable"),
    ],
    ids=["truncated", "flipped", "no-file", "no-metadata", "no-manifest", "edited", "garbled"],
)
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(
    tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    older = _save(tmp_path, 2)
    _save(tmp_path, 4)
    damage(tmp_path / step_name(4))
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 2
    assert len(notes) == 1
    assert f"skipped checkpoint {tmp_path / step_name(4)}: " in notes[0]
    assert re.search(reason, notes[0]), notes[0]
    loaded = checkpoint.read_tensors(found.directory)
    assert all(torch.equal(loaded[key], value) for key, value in older.items())


def test_resume_passes_over_a_checkpoint_with_an_unreadable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error (EIO from a failing disk, EACCES) is one more damage to pass over: it
    stopped the resume with a traceback although an older checkpoint was intact."""
    older = _save(tmp_path, 2)
    _save(tmp_path, 4)
    victim = tmp_path / step_name(4) / "__0_0.distcp"
    hash_file = checkpoint.file_sha256

    def failing_disk(path: Path) -> str:
        if path == victim:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return hash_file(path)

    monkeypatch.setattr(checkpoint, "file_sha256", failing_disk)
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 2
    assert notes == [f"skipped checkpoint {tmp_path / step_name(4)}: file __0_0.distcp is "
                     f"unreadable ({os.strerror(errno.EIO)})"]  # fmt: skip
    loaded = checkpoint.read_tensors(found.directory)
    assert all(torch.equal(loaded[key], value) for key, value in older.items())


@pytest.mark.parametrize("name", [checkpoint.MANIFEST, "__0_0.distcp"])
@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
def test_resume_passes_over_a_checkpoint_whose_files_cannot_be_looked_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, code: int
) -> None:
    """A stat that fails otherwise than "no such file" (a folder made unsearchable, a failing
    disk) raised out of the checks of the newest checkpoint (Path.is_file raises it) and
    stopped the resume, although an older one was intact."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    victim = tmp_path / step_name(4) / name
    stat = Path.stat

    def failing_lookup(path: Path, **kwargs: object) -> os.stat_result:
        if path == victim:
            raise OSError(code, os.strerror(code), str(path))
        return stat(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "stat", failing_lookup)
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 2
    assert len(notes) == 1 and os.strerror(code) in notes[0], notes
    assert notes[0].startswith(f"skipped checkpoint {tmp_path / step_name(4)}: ")


def test_a_corrupt_latest_or_a_deleted_newest_folder_is_passed_over(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    (tmp_path / checkpoint.LATEST).write_bytes(b"\xffstep-oops")
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 4
    assert len(notes) == 1 and notes[0].startswith(f"{tmp_path / checkpoint.LATEST} is corrupt (")
    (tmp_path / checkpoint.LATEST).write_text("step-12")
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 4
    assert notes == [f"{tmp_path / checkpoint.LATEST} is corrupt ('step-12'); ignored it"]
    (tmp_path / checkpoint.LATEST).write_text(step_name(4))
    shutil.rmtree(tmp_path / step_name(4))
    found, notes = find_intact(tmp_path)
    assert found is not None and found.step == 2
    assert notes == [f"{tmp_path / checkpoint.LATEST} names {step_name(4)}, which is missing; "
                     "ignored it"]  # fmt: skip
    shutil.rmtree(tmp_path / step_name(2))
    assert find_intact(tmp_path)[0] is None


def _plant_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """tempfile's next random names become "planted", then "fresh"."""
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["planted", "fresh"]))


def test_temporary_files_never_follow_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    # The temporary names a predictable scheme would use, and the next "random" ones.
    planted = [root / f".latest.tmp-{os.getpid()}", root / ".latest.planted",
               root / f".{checkpoint.MANIFEST}.planted"]  # fmt: skip
    for link in planted:
        link.symlink_to(victim)
    staging_link = root / f".{step_name(1)}.partial-planted"
    staging_link.symlink_to(victim_dir, target_is_directory=True)
    _plant_names(monkeypatch)
    checkpoint.write_atomic(root / "latest", b"hello")
    assert (root / "latest").read_bytes() == b"hello" and not (root / "latest").is_symlink()
    _plant_names(monkeypatch)
    saved = _save(root, 1)
    assert victim.read_bytes() == b"precious"
    assert list(victim_dir.iterdir()) == []
    for link in [*planted, staging_link]:
        assert link.is_symlink(), link
    found, _ = find_intact(root)
    assert found is not None and found.step == 1
    assert torch.equal(checkpoint.read_tensors(found.directory)["model.weight"],
                       saved["model.weight"])  # fmt: skip


def test_a_full_disk_is_named_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.distributed.checkpoint's error names only the ranks ("CheckpointException
    ranks:dict_keys([0, 1])", all the user saw): the error says what each rank hit."""
    import torch.distributed.checkpoint as dcp

    saved = _save(tmp_path, 2)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", full_disk)
    with pytest.raises(CheckpointError) as raised:
        _save(tmp_path, 4)
    assert str(raised.value) == (
        f"could not write checkpoint {tmp_path / step_name(4)}: rank 0: OSError: [Errno 28] No "
        "space left on device"
    )
    found, _ = find_intact(tmp_path)
    assert found is not None and found.step == 2
    assert torch.equal(checkpoint.read_tensors(found.directory)["model.weight"],
                       saved["model.weight"])  # fmt: skip


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_checkpoint_that_does_not_fit_names_what_failed(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*step-00000002: "
                       r"rank 0: ValueError: Size mismatch .* for model\.weight"):  # fmt: skip
        checkpoint.load(tmp_path / step_name(2), {"model.weight": torch.empty(2, 2)})


def test_a_read_only_folder_is_refused_before_any_work(read_only_folder: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint folder .* is not writable \("):
        check_folder(read_only_folder, resume=False, overwrite=False)


def test_someone_elses_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(CheckpointError, match=r"belongs to user id \d+, not to you"):
        check_folder(tmp_path, resume=False, overwrite=False)


def test_a_restarted_torchrun_job_continues_or_starts_over(tmp_path: Path) -> None:
    config = TrainConfig(checkpoint_dir=tmp_path, metrics_dir=tmp_path / "metrics")
    assert restarted_config(config, 0, job="job-a") == config
    assert prepare(config, job="job-a") is None  # the first attempt is let in
    assert (tmp_path / checkpoint.JOB).read_text() == "job-a"
    # Restarted before its first checkpoint: it starts over, replacing its own first files.
    assert restarted_config(config, 1, job="job-a") == dataclasses.replace(config, overwrite=True)
    resume = dataclasses.replace(config, resume=True)
    assert restarted_config(resume, 1, job="job-a") == resume
    _save(tmp_path, 3)
    assert restarted_config(config, 2, job="job-a") == resume
    overwrite = dataclasses.replace(config, overwrite=True)
    assert restarted_config(overwrite, 1, job="job-a") == resume
    # The record is no checkpoint: it is passed over, kept by retention, left by --overwrite.
    _save(tmp_path, 4, keep=1)
    assert find_intact(tmp_path)[1] == [] and checkpoint.list_steps(tmp_path) == [4]
    assert prepare(overwrite, job="job-b") is None
    assert checkpoint.list_steps(tmp_path) == []
    assert (tmp_path / checkpoint.JOB).read_text() == "job-b"
    assert prepare(config) is None  # not a torchrun job: no job's record stays
    assert not (tmp_path / checkpoint.JOB).exists()


@pytest.mark.parametrize("earlier", ["checkpoints", "metrics"])
def test_a_restart_of_a_job_refused_at_its_start_is_refused_again(
    tmp_path: Path, earlier: str
) -> None:
    """torchrun --max-restarts restarted a new job that its folders refused (they hold an
    earlier run's checkpoints or metrics), and the restart went on with --resume (training on
    from the earlier run) or --overwrite (deleting the earlier run's metrics)."""
    root, metrics = tmp_path / "checkpoints", tmp_path / "metrics"
    earlier_run = TrainConfig(checkpoint_dir=root, metrics_dir=metrics, steps=200)
    assert prepare(earlier_run, job="job-a") is None
    if earlier == "checkpoints":
        _save(root, 100)
    else:
        (metrics / "steps.csv").write_text("step,loss\n0,5.5\n")
    before = sorted(p.name for p in [*root.iterdir(), *metrics.iterdir()])
    new_job = dataclasses.replace(earlier_run, steps=300)
    errors = []
    for restarts in range(3):
        config = restarted_config(new_job, restarts, job="job-b")
        assert config == new_job
        with pytest.raises((CheckpointError, MetricsFolderError)) as refused:
            prepare(config, job="job-b")
        errors.append(str(refused.value))
    assert len(set(errors)) == 1 and "already holds" in errors[0]
    assert sorted(p.name for p in [*root.iterdir(), *metrics.iterdir()]) == before
    assert (root / checkpoint.JOB).read_text() == "job-a"
    # A job without an id (no store outlived its first attempt) is never taken for another.
    assert restarted_config(new_job, 1, job=None) == new_job


def test_under_torchrun_every_restart_of_a_refused_job_is_refused_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new one-rank torchrun job in a folder holding an earlier run's checkpoint, in this
    process: its first attempt and a restart, with the store this test hosts as torchrun's
    agent does."""
    _save(tmp_path, 100)
    agent_store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(agent_store.port),
                "TORCHELASTIC_USE_AGENT_STORE": "True"}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    errors = []
    for restarts in range(2):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))
        assert run(TrainConfig(checkpoint_dir=tmp_path, steps=200)) == 1
        errors.append(capsys.readouterr().err)
    refusal = (
        f"fastpar train: checkpoint folder {tmp_path} already holds checkpoints (newest: "
        f"{step_name(100)}); pass --resume to continue that run, --overwrite to delete them and "
        "start over, or choose another --checkpoint-dir\n"
    )
    assert errors == [refusal, refusal]
    assert checkpoint.list_steps(tmp_path) == [100]
    assert not (tmp_path / checkpoint.JOB).exists()


def _one_rank(config: TrainConfig) -> tuple[RankPlace, Stage, Batches]:
    """What a one-rank run of `config` trains (no process group needed)."""
    place = RankPlace(dims=config.layout(1), rank=0, replica=0, stage=0, dp_group=None,
                      pp_group=None)  # fmt: skip
    return place, build_stage(config, place, torch.device("cpu")), Batches(config, place, 64)


def _lstm_checkpoint(root: Path) -> tuple[TrainConfig, Found]:
    """A one-rank LSTM run's options and its checkpoint of step 1."""
    lstm = TrainConfig(embed=4, hidden=8, layers=1, seq_len=8, batch_size=2, train_bytes=4_000,
                       validation_bytes=1_000, steps=2, checkpoint_dir=root)  # fmt: skip
    place, stage, batches = _one_rank(lstm)
    save_checkpoint(lstm, 1, place, stage.module, stage.optimizer, batches)
    found, _ = find_intact(root)
    assert found is not None
    return lstm, found


def test_a_resume_with_another_cell_is_refused_naming_it(tmp_path: Path) -> None:
    """An LSTM's weights do not fit a GRU: the resume must say which option changed, not fail in
    torch.distributed.checkpoint with "CheckpointException ranks:dict_keys([0, 1])"."""
    lstm, found = _lstm_checkpoint(tmp_path)
    gru = dataclasses.replace(lstm, cell="gru")
    place, stage, batches = _one_rank(gru)
    with pytest.raises(CheckpointError, match="written with --cell lstm; this run has --cell gru"):
        restore(gru, found, place, stage.module, stage.optimizer, batches)
    # A manifest from before --cell existed was written by an LSTM run.
    options = {k: v for k, v in found.manifest["options"].items() if k != "cell"}
    older = dataclasses.replace(found, manifest={**found.manifest, "options": options})
    check_options(lstm, older)
    with pytest.raises(CheckpointError, match="--cell lstm"):
        check_options(gru, older)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_manifest_of_one_rng_record_still_sets_the_streams(tmp_path: Path) -> None:
    """Manifests written before every rank's streams were recorded hold rank 0's as the "rng"
    record itself; a resume from one sets them as it did."""
    lstm, found = _lstm_checkpoint(tmp_path)
    saved_torch, saved_python = torch.get_rng_state(), random.getstate()  # as the save found them
    (rank0,) = found.manifest["rng"]["ranks"]
    older = dataclasses.replace(found, manifest={**found.manifest, "rng": rank0})
    place, stage, batches = _one_rank(lstm)
    torch.seed()
    random.seed()
    restore(lstm, older, place, stage.module, stage.optimizer, batches)
    assert torch.equal(torch.get_rng_state(), saved_torch)
    assert random.getstate() == saved_python


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_resume_trains_at_its_own_lr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--lr may change across a resume (lowering it is common); the optimizer state loaded from
    the checkpoint silently brought back the old one."""
    lstm, found = _lstm_checkpoint(tmp_path)
    lower = dataclasses.replace(lstm, lr=lstm.lr / 10)
    place, stage, batches = _one_rank(lower)
    with caplog.at_level(logging.WARNING, logger="fastpar.training.state"):
        restore(lower, found, place, stage.module, stage.optimizer, batches)
    assert stage.optimizer.state  # the checkpoint's Adam moments were loaded
    assert {group["lr"] for group in stage.optimizer.param_groups} == {lower.lr}
    assert [r.getMessage() for r in caplog.records if r.name == "fastpar.training.state"] == [
        f"training from step {found.step} at --lr {lower.lr:g}; the checkpoint's run trained "
        f"at {lstm.lr:g}"
    ]


def test_under_torchrun_a_resume_with_other_options_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the ranks restore, they refuse the checkpoint: torchrun's rank 0 says why in one line,
    as the local launcher does (every rank printed its traceback). A one-rank torchrun job, in
    this process."""
    lstm, found = _lstm_checkpoint(tmp_path)
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    assert run(dataclasses.replace(lstm, cell="rnn", resume=True)) == 1
    assert capsys.readouterr().err.strip() == (
        f"fastpar train: checkpoint {found.directory} was written with --cell lstm; this run has "
        "--cell rnn: resume with the same value"
    )
