"""Training checkpoints: torch.distributed.checkpoint (DCP) files plus a manifest that makes each
one verifiable, written so that no failure loses the last good one.

Layout:
    DIR/step-00000120/   .metadata, __0_0.distcp ... (DCP), fastpar.json (the manifest)
    DIR/latest           "step-00000120"
    DIR/job-id           the torchrun job let in last (`record_job`), for its restarts

Writing: every rank writes its part with `dcp.save` into a staging folder that rank 0 created
with `mkdtemp` (a fresh name only this user can write into, so nothing planted there is followed).
Once every rank returned, rank 0 records each file's size and SHA-256 in `fastpar.json`, renames
the staging folder to `step-N`, then moves `latest` (written through `mkstemp` + rename). A crash
at any point leaves the previous checkpoints and `latest` intact.

Reading: the newest step whose manifest and files check out is taken; every newer one that does
not is reported with the reason (missing manifest, a truncated or corrupt file, ...). `latest` is
only a hint: a corrupt one, or one naming a deleted folder, is reported and passed over.

Retention keeps the step just written and the `keep - 1` newest older ones, and never touches a
newer step (it may belong to another run: that is refused at start, see `check_folder`).

Steps are written with at least 8 digits (`step-100000000` after `step-99999999`): every
list of steps is sorted by number, never by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastpar._checks import check_int
from fastpar._machine import file_sha256, probe_writable

# torch is imported where it is used: the launcher of `fastpar train` (which checks folders and
# picks checkpoints before it starts the ranks) runs without it.
if TYPE_CHECKING:
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

LATEST = "latest"
MANIFEST = "fastpar.json"
JOB = "job-id"
FORMAT = 1
_STEP_NAME = re.compile(r"step-(\d{8,})")
_STAGING_SUFFIX = ".partial-"


class CheckpointError(RuntimeError):
    """An expected checkpoint problem; the message is one line that says what to do."""


@dataclass(frozen=True)
class Found:
    """An intact checkpoint: its step, folder and manifest."""

    step: int
    directory: Path
    manifest: dict[str, Any]


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_steps(root: Path) -> list[int]:
    """Steps with a published folder under `root`, ascending (staging folders excluded)."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_NAME.fullmatch(entry.name)
        if match is None or entry.name != step_name(int(match.group(1))):
            continue  # only step_name's spelling is a step: "step-000000005" would list 5 twice
        if entry.is_dir() and not entry.is_symlink():
            steps.append(int(match.group(1)))
    return sorted(steps)


# ---------------------------------------------------------------------------- safe writes


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file that `mkstemp` creates exclusively in the
    same folder (O_CREAT | O_EXCL: an existing name, a symlink included, is never opened), then
    flush it to disk and rename it over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_folder(root: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the checkpoint folder before any work: it must be a folder this user owns and can
    write; `resume` needs it to exist; a fresh run refuses one that holds checkpoints unless
    `overwrite`, which deletes them. Creates the folder (mode 0700) for a fresh run.

    Raises:
        CheckpointError: with a one-line message saying what to do.
    """
    if resume and not root.exists():
        raise CheckpointError(
            f"--resume: checkpoint folder {root} does not exist; check --checkpoint-dir, or "
            "drop --resume to start a new run"
        )
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(
            f"cannot create checkpoint folder {root} ({error.strerror}); choose another "
            "--checkpoint-dir"
        ) from None
    info = root.stat()  # follows a symlinked folder: what matters is where the files go
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"--checkpoint-dir {root} is not a folder")
    if info.st_uid != os.geteuid():
        raise CheckpointError(
            f"checkpoint folder {root} belongs to user id {info.st_uid}, not to you "
            f"({os.geteuid()}); choose a folder of your own with --checkpoint-dir"
        )
    try:
        probe_writable(root)
    except OSError as error:
        raise CheckpointError(
            f"checkpoint folder {root} is not writable ({error.strerror}); fix its permissions "
            "or choose another --checkpoint-dir"
        ) from None
    steps = list_steps(root)
    if not resume and (steps or (root / LATEST).exists()):
        if not overwrite:
            newest = f" (newest: {step_name(steps[-1])})" if steps else ""
            raise CheckpointError(
                f"checkpoint folder {root} already holds checkpoints{newest}; pass --resume to "
                "continue that run, --overwrite to delete them and start over, or choose "
                "another --checkpoint-dir"
            )
        for step in steps:
            shutil.rmtree(root / step_name(step))
        (root / LATEST).unlink(missing_ok=True)
    for staging in root.glob(f".step-*{_STAGING_SUFFIX}*"):  # left by a save that was killed
        shutil.rmtree(staging, ignore_errors=True)


def record_job(root: Path, job: str | None) -> None:
    """Record in `root` that the torchrun job of id `job` was let in (its folders checked and
    prepared); None (not a torchrun job that outlives its attempts) removes an earlier job's
    record.

    Raises:
        CheckpointError: the record cannot be written (a full disk, say).
    """
    try:
        if job is None:
            (root / JOB).unlink(missing_ok=True)
        else:
            write_atomic(root / JOB, job.encode())
    except OSError as error:
        raise CheckpointError(
            f"cannot write {root / JOB} ({error.strerror or error}); free space or choose "
            "another --checkpoint-dir"
        ) from None


def recorded_job(root: Path) -> str | None:
    """The job id `record_job` left in `root`, or None."""
    try:
        return (root / JOB).read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------- integrity


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def problem(directory: Path) -> tuple[str | None, dict[str, Any]]:
    """(why `directory` is not an intact checkpoint, or None; its manifest when readable)."""
    path = directory / MANIFEST
    # A failing disk (EIO) or a folder made unsearchable (EACCES) fails even a stat (is_file
    # raises those): an older checkpoint may do.
    try:
        if not directory.is_dir():
            return "the folder is missing", {}
        if not path.is_file():
            return f"{MANIFEST} is missing (a save that did not finish)", {}
        manifest = json.loads(path.read_bytes())
        if not isinstance(manifest, dict) or manifest.get("checksum") != _manifest_checksum(
            manifest
        ):
            return f"{MANIFEST} is corrupt (checksum mismatch)", {}
    except (OSError, ValueError) as error:
        return f"{MANIFEST} is unreadable ({error})", {}
    if manifest.get("format") != FORMAT:
        return f"{MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT}", {}
    for name, expected in sorted(manifest["files"].items()):
        file = directory / name
        try:
            if not file.is_file():
                return f"file {name} is missing", manifest
            size = file.stat().st_size
            if size != expected["bytes"]:
                kind = "truncated" if size < expected["bytes"] else "longer than written"
                return (f"file {name} is {kind} ({size} bytes, expected {expected['bytes']})",
                        manifest)  # fmt: skip
            if file_sha256(file) != expected["sha256"]:
                return f"file {name} is corrupt (SHA-256 mismatch)", manifest
        except OSError as error:
            return f"file {name} is unreadable ({error.strerror or error})", manifest
    return None, manifest


def find_intact(root: Path) -> tuple[Found | None, list[str]]:
    """The newest intact checkpoint under `root` (None when there is none), and one line per
    checkpoint or pointer passed over, saying why."""
    notes = []
    pointer = root / LATEST
    if pointer.exists() or pointer.is_symlink():
        try:
            text = pointer.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as error:
            text = f"<unreadable: {error}>"
        if not _STEP_NAME.fullmatch(text):
            notes.append(f"{pointer} is corrupt ({text[:40]!r}); ignored it")
        elif not (root / text).is_dir():
            notes.append(f"{pointer} names {text}, which is missing; ignored it")
    for step in reversed(list_steps(root)):
        directory = root / step_name(step)
        reason, manifest = problem(directory)
        if reason is None:
            return Found(step, directory, manifest), notes
        notes.append(f"skipped checkpoint {directory}: {reason}")
    return None, notes


# ---------------------------------------------------------------------------- save and load


def save(
    root: Path, step: int, state: dict[str, Any], metadata: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write checkpoint `step` (a collective over the default group, when there is one).

    Arguments:
        root: the checkpoint folder (checked by `check_folder`).
        step: the step the checkpoint resumes at.
        state: this rank's tensors for DCP, under names shared by every layout; tensors under
            the same name on several ranks must be equal (DCP writes one copy).
        metadata: JSON-serialisable values recorded in the manifest (rank 0's is used).
        keep: how many checkpoints to keep, >= 1 (the new one included).

    Returns:
        The folder of the new checkpoint.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    check_int("keep", keep, 1)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    final = root / step_name(step)
    # [staging folder, error]: rank 0's outcome, which every rank must learn (a rank that
    # raised alone would leave the others waiting in the next collective).
    outcome: list[str | None] = [None, None]
    if rank == 0:
        try:
            outcome[0] = tempfile.mkdtemp(dir=root, prefix=f".{final.name}{_STAGING_SUFFIX}")
        except OSError as failure:
            outcome[1] = f"could not write checkpoint {final}: {failure}"
    _raise_rank0_error(outcome, distributed)
    staging = Path(str(outcome[0]))
    writer = dcp.FileSystemWriter(staging, sync_files=True)
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.save(state, storage_writer=writer, no_dist=not distributed)
        except CheckpointException as failure:  # raised on every rank, with every rank's errors
            raise CheckpointError(
                f"could not write checkpoint {final}: {_rank_errors(failure)}"
            ) from None
    # dcp.save returns on every rank once the coordinator wrote .metadata, after every rank's
    # files were written: rank 0 can now seal the checkpoint.
    if rank == 0:
        try:
            _seal(staging, final, step, metadata)
            write_atomic(root / LATEST, final.name.encode())
            _prune(root, step, keep)
        except OSError as failure:
            outcome[1] = f"could not write checkpoint {final}: {failure}"
    _raise_rank0_error(outcome, distributed)
    return final


def _rank_errors(failure: CheckpointException) -> str:
    """Each distinct error of a DCP failure once, with its ranks ("ranks 0, 1: OSError: [Errno
    28] No space left on device: ...") for the message: DCP's own names only the ranks."""
    ranks_of: dict[str, list[str]] = {}
    for rank, (error, _) in sorted(failure.failures.items()):
        ranks_of.setdefault(f"{type(error).__name__}: {error}", []).append(str(rank))
    return "; ".join(f"{'ranks' if len(r) > 1 else 'rank'} {', '.join(r)}: {text}"
                     for text, r in ranks_of.items())  # fmt: skip


def _raise_rank0_error(outcome: list[str | None], distributed: bool) -> None:
    """Every rank learns rank 0's outcome and raises its error, if any."""
    if distributed:
        import torch.distributed as dist

        dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise CheckpointError(outcome[1])


def _seal(staging: Path, final: Path, step: int, metadata: dict[str, Any]) -> None:
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(staging.iterdir())
        if path.is_file()
    }
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files, **metadata}
    manifest["checksum"] = _manifest_checksum(manifest)
    write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
    if final.exists():  # a checkpoint of this step that was skipped as damaged: replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_directory(final.parent)


def _prune(root: Path, newest: int, keep: int) -> None:
    older = [step for step in list_steps(root) if step < newest]
    for step in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(root / step_name(step), ignore_errors=True)


def load(directory: Path, state: dict[str, Any]) -> None:
    """Fill `state` (this rank's tensors, named as when saved) in place from the checkpoint in
    `directory` (a collective over the default group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory))
    except CheckpointException as failure:
        raise CheckpointError(
            f"could not read checkpoint {directory}: {_rank_errors(failure)}"
        ) from None


def read_tensors(directory: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose name starts with `prefix`, in this process alone (no
    process group needed): for evaluation and tests."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(directory).read_metadata()
    state = {
        key: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    return {key.removeprefix(prefix): value for key, value in state.items()}
