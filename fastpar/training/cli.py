"""`fastpar train`: argument parsing and the launch, local (`--nproc`) or under torchrun."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from fastpar._machine import output_folder_problem
from fastpar.training.config import (
    MAX_SEED,
    BackendName,
    BalanceName,
    CellName,
    CommName,
    ParallelMode,
    ScheduleName,
    SlicingMode,
    TrainConfig,
)

if TYPE_CHECKING:  # torch is imported when a run starts, not to parse options or show help
    import torch.distributed as dist

    from fastpar.training.checkpoint import Found

_DEFAULTS = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fastpar train`, one per TrainConfig field."""
    d = _DEFAULTS
    add = parser.add_argument
    add("--nproc", type=int, default=d.nproc, help="local processes (ignored under torchrun)")
    add("--parallel", choices=get_args(ParallelMode), default=d.parallel,
        help="dp: replicas of the whole model; pp: one pipeline with a stage per rank; dp+pp: "
             "replicas of --pp-stages-stage pipelines")  # fmt: skip
    add("--pp-stages", type=int, default=d.pp_stages, help="stages per pipeline with dp+pp")
    add("--microbatches", type=int, default=d.microbatches, help="micro-batches per pipeline step")
    add("--schedule", choices=get_args(ScheduleName), default=d.schedule,
        help="pipeline schedule; interleaved-1f1b and zbv give each rank two model chunks, "
             "zero-bubble and zbv defer the weight gradients into the bubble")  # fmt: skip
    add("--balance", choices=get_args(BalanceName), default=d.balance,
        help="pipeline cuts: even (modules per stage) or auto (measured forward+backward "
             "time per module, the slowest stage made fastest)")  # fmt: skip
    add("--comm", choices=get_args(CommName), default=d.comm,
        help="gradient all-reduce: auto (fastpar's ring inside a host, hierarchical across "
             "hosts, else torch.distributed), ring (fastpar's or an error) or torch")  # fmt: skip
    add("--backend", choices=get_args(BackendName), default=d.backend,
        help="recurrent kernels: triton (fastpar's), torch (torch's native ones), "
             "reference (the pure-PyTorch loop), auto (triton where measured faster, "
             "else torch's)")  # fmt: skip
    add("--cell", choices=get_args(CellName), default=d.cell, help="recurrent cell per layer")
    add("--embed", type=int, default=d.embed, help="embedding size")
    add("--hidden", type=int, default=d.hidden, help="hidden size of each recurrent layer")
    add("--layers", type=int, default=d.layers, help="recurrent layers")
    add("--seq-len", type=int, default=d.seq_len, help="bytes per training window")
    add("--batch-size", type=int, default=d.batch_size, help="windows per step and replica")
    add("--steps", type=int, default=d.steps, help="optimizer steps in the whole run")
    add("--lr", type=float, default=d.lr, help="Adam learning rate")
    add("--slicing", choices=get_args(SlicingMode), default=d.slicing,
        help="how a step's batch is cut between replicas: fixed (equal blocks), throughput "
             "(blocks that follow each replica's speed) or loss (one block size, grown while "
             "the loss is stable, shrunk after a spike)")  # fmt: skip
    add("--train-bytes", type=int, default=d.train_bytes, help="training text size")
    add("--validation-bytes", type=int, default=d.validation_bytes,
        help="validation text size (files kept apart from the training text)")  # fmt: skip
    add("--validation-batches", type=int, default=d.validation_batches,
        help="batches of the validation text per validation loss")  # fmt: skip
    add("--checkpoint-dir", type=Path, default=d.checkpoint_dir,
        help="folder of the run's checkpoints")  # fmt: skip
    add("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between saves")
    add("--resume", action="store_true",
        help="continue from the newest intact checkpoint in --checkpoint-dir")  # fmt: skip
    add("--overwrite", action="store_true",
        help="start anew in a --checkpoint-dir holding checkpoints (or a --metrics folder "
             "holding an earlier run's metrics), deleting them")  # fmt: skip
    add("--profile", dest="profile_dir", type=Path, default=None,
        help="write a torch.profiler Chrome trace per rank (trace-rank<N>.json) into this "
             "folder, created if missing")  # fmt: skip
    add("--metrics", dest="metrics_dir", type=Path, default=None,
        help="write TensorBoard events, CSV and a PNG of the run into this folder")  # fmt: skip
    add("--sample-bytes", type=int, default=d.sample_bytes, help="length of the final sample")
    add("--seed", type=int, default=d.seed,
        help=f"seed of the initialisation and the shuffle, 0 to {MAX_SEED}")  # fmt: skip
    add("--timeout", dest="timeout_s", type=float, default=d.timeout_s,
        help="seconds any wait for a peer may take before the run stops with an error")  # fmt: skip
    add("--log-every", type=int, default=d.log_every,
        help="steps between progress lines (and metrics windows)")  # fmt: skip
    add("--debug", action="store_true", help="show the ranks' tracebacks when a run fails")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    try:
        config = TrainConfig(**values)
        if not _under_torchrun():
            config.layout(config.nproc)  # torchrun's world size is checked by the ranks
        if config.metrics_dir is not None:
            from fastpar.training.metrics_files import check_metrics_available

            check_metrics_available()
        if config.profile_dir is not None:
            check_profile_folder(config.profile_dir)
    except (ValueError, TypeError, ImportError) as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits
    return config


def check_profile_folder(directory: Path) -> None:
    """Create `directory` and check that it takes files, before any rank starts: the ranks
    write their traces (trace-rank<N>.json) into it only once the profiled steps are done.

    Raises:
        ValueError: `directory` is a file, or cannot be created or written.
    """
    problem = output_folder_problem(directory, "--profile", "profile")
    if problem is not None:
        raise ValueError(problem)


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    )


def _train_entry(
    rank: int, world_size: int, config: TrainConfig, resume: Found | None
) -> dict[str, Any] | None:
    import logging

    from fastpar.training.loop import train_rank

    if rank == 0 and not logging.getLogger().handlers:
        # A spawned rank (--nproc): rank 0 says what it chose (all-reduce, kernels) as it does
        # under torchrun, where `python -m fastpar` configured logging.
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    return train_rank(config, resume)


def prepare(config: TrainConfig, *, job: str | None = None) -> Found | None:
    """Check the checkpoint and metrics folders and pick the checkpoint to resume, before any
    rank starts work; reports every checkpoint passed over on stderr. Once all is well, the
    checkpoint folder records `job` (a torchrun job's `job_id`, for `restarted_config`; None
    removes an earlier job's record).

    Returns:
        The checkpoint to resume, or None for a new run.

    Raises:
        CheckpointError: the checkpoint folder is unusable, or `--resume` has nothing to
            continue.
        MetricsFolderError: the metrics folder is unusable.
    """
    from fastpar.training import checkpoint, metrics_folder

    root = config.checkpoint_dir
    replaced: list[Path] = []
    if config.metrics_dir is not None:  # checked before --overwrite deletes any checkpoint
        replaced = metrics_folder.files_to_replace(
            config.metrics_dir, resume=config.resume, overwrite=config.overwrite
        )
        if config.resume:
            from fastpar.training.metrics_files import CSV_COLUMNS

            metrics_folder.check_columns(config.metrics_dir, CSV_COLUMNS)
    checkpoint.check_folder(root, resume=config.resume, overwrite=config.overwrite)
    metrics_folder.delete_files(replaced)
    found = _checkpoint_to_resume(config) if config.resume else None
    checkpoint.record_job(root, job)
    return found


def _checkpoint_to_resume(config: TrainConfig) -> Found:
    """The newest intact checkpoint of --checkpoint-dir, which must be before --steps; every one
    passed over is reported on stderr."""
    from fastpar.training import checkpoint
    from fastpar.training.checkpoint import CheckpointError

    root = config.checkpoint_dir
    found, notes = checkpoint.find_intact(root)
    for note in notes:
        print(f"fastpar train: {note}", file=sys.stderr)
    if found is None:
        if notes:
            raise CheckpointError(
                f"--resume: no intact checkpoint in {root}; rerun with --overwrite instead of "
                "--resume to start over"
            )
        raise CheckpointError(
            f"--resume: {root} holds no checkpoint; drop --resume to start a new run"
        )
    if found.step >= config.steps:
        raise CheckpointError(
            f"--resume: checkpoint {found.directory} is at step {found.step}, which already "
            f"reaches --steps {config.steps}; raise --steps to train further"
        )
    return found


def _resume_hint(config: TrainConfig) -> str:
    from fastpar.training import checkpoint

    found, _ = checkpoint.find_intact(config.checkpoint_dir)
    if found is not None and found.step >= config.steps:  # stopped after its last save
        return (f"training had reached --steps {config.steps}: checkpoint {found.directory} "
                "holds the trained model")  # fmt: skip
    if found is not None:
        return f"rerun with --resume to continue from step {found.step}"
    if checkpoint.list_steps(config.checkpoint_dir):
        return "no intact checkpoint was written; rerun with --overwrite to start over"
    return "no checkpoint was written yet"


def _failure_lines(summary: str) -> list[str]:
    """One line per distinct failure, with the ranks that share it ("ranks 0, 1: ...")."""
    ranks_of: dict[str, list[str]] = {}
    for line in summary.splitlines():
        match = re.fullmatch(r"rank (\d+): (.*)", line)
        rank, text = match.groups() if match else ("", line)
        ranks_of.setdefault(text, []).append(rank)
    return [f"{'ranks' if len(r) > 1 else 'rank'} {', '.join(r)}: {text}" if r[0] else text
            for text, r in ranks_of.items()]  # fmt: skip


def _print_summary(summary: dict[str, Any]) -> None:
    if summary["resumed_from"]:
        print(f"resumed from step {summary['resumed_from']}")
    print(f"steps: {summary['steps']}")
    print(f"validation loss: {summary['validation_loss']:.4f} (nats per byte)")
    print(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s")
    if "metrics" in summary:
        metrics = summary["metrics"]
        share = metrics["cost_s"] / metrics["run_s"] if metrics["run_s"] > 0 else 0.0
        print(
            f"metrics: {metrics['plot'].parent} (recording and writing took "
            f"{metrics['cost_s'] * 1e3:,.0f} ms, {share:.2%} of the run; plot "
            f"{metrics['plot'].name})"
        )
    print("sample:")
    print(summary["sample"])


def _init_under_torchrun(timeout_s: float) -> tuple[dist.Store | None, int]:
    """The default process group from torchrun's environment, with its keys under a prefix
    per attempt (`join_attempt`): an attempt must not read the addresses its dead predecessors
    left in the same store (gloo would try to connect to them), and TORCHELASTIC_RESTART_COUNT
    does not tell a restart after a membership change from the attempt before it.

    Returns:
        torchrun's store, which serves the job's attempts while its host stays (`job_id`);
        None where rank 0 hosts the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), which dies
        with it. And the attempt's number on the store (1: the first it served).
    """
    import torch.distributed as dist

    from fastpar.launch import default_backend
    from fastpar.training.attempts import join_attempt

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s)
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
    )
    attempt = join_attempt(store, rank=rank, world_size=world_size, timeout_s=timeout_s)
    prefixed = dist.PrefixStore(f"fastpar/attempt{attempt}", store)
    backend = default_backend()
    if backend == "nccl":  # object collectives (the checkpoint choice) run on the current GPU
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout
    )
    return (store if agent_hosts_store else None), attempt


_JOB_KEY = "fastpar/job"


def job_id(store: dist.Store | None, restarts: int) -> tuple[str | None, str | None]:
    """This torchrun job's id: the same in every attempt of the job (`restarts` earlier ones),
    and another in every other job that torch tells apart. In order of preference:

    - torchrun's run id (TORCHELASTIC_RUN_ID), which its agents give every attempt: the user's
      --rdzv-id (torchrun asks for one per job), or the uuid torchrun draws for --standalone and
      for one host (--nnodes 1) given neither --rdzv-endpoint nor --master-port;
    - where that is "none" (several hosts, or a static rendezvous, without --rdzv-id: every such
      job shares it), a random id that the first attempt leaves in torchrun's `store`. The agents
      keep one store for every attempt only while its host stays: a c10d rendezvous whose rank 0
      moves to another host (nodes left or joined) gives the next attempt a fresh one, and the
      id changes;
    - None where neither is there (rank 0 hosts a store per attempt, `store` is None).

    Returns:
        The id or None, and why a restart cannot tell its own checkpoints (None where it can).
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id not in ("", "none"):
        return f"rdzv-id {run_id}", None
    why = "no --rdzv-id names the job and"
    if store is None:
        return None, (f"{why} torchrun's store did not outlive the first attempt" if restarts
                      else None)  # fmt: skip
    drawn = uuid.uuid4().hex
    job = store.compare_set(_JOB_KEY, "", drawn).decode()
    if restarts and job == drawn:  # kept: the attempts after this one on this store know it
        return job, f"{why} torchrun's store is newer than the first attempt (its host moved)"
    return job, None


def _prepare_under_torchrun(
    config: TrainConfig, restarts: int, store: dist.Store | None, attempt: int
) -> tuple[Found | None, TrainConfig]:
    """`prepare` of the attempt (its options from `restarted_config`) on rank 0; its answer (or
    its error) and options shared with every rank."""
    import torch.distributed as dist

    from fastpar.training.checkpoint import CheckpointError
    from fastpar.training.metrics_folder import MetricsFolderError

    answer: list[Any] = [None, None, config]
    if dist.get_rank() == 0:
        job, unrecognised = job_id(store, restarts)
        if unrecognised is not None:
            print(f"fastpar train: restart {restarts}: {unrecognised}, so it cannot tell its own "
                  "checkpoints from another run's; it keeps --resume and --overwrite as given",
                  file=sys.stderr)  # fmt: skip
        if attempt > 1 and restarts == 0:
            print(f"fastpar train: attempt {attempt} of this job on torchrun's store: torchrun "
                  "restarted it without counting a failure (a node joined)",
                  file=sys.stderr)  # fmt: skip
        try:
            answer[2] = restarted_config(config, restarts, job=job, attempt=attempt)
            answer[0] = prepare(answer[2], job=job)
        except (CheckpointError, MetricsFolderError) as error:
            answer[1] = str(error)
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise CheckpointError(answer[1])  # the same one line on every rank
    return answer[0], answer[2]


class _Terminated(BaseException):  # like KeyboardInterrupt: no `except Exception` takes it
    """SIGTERM reached the launcher (kill, a scheduler's time limit, `timeout`)."""


def _raise_terminated(signum: int, frame: object) -> None:
    # A second SIGTERM ends the launcher at once; PR_SET_PDEATHSIG still takes the ranks.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise _Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises `_Terminated` in the launcher, so that it stops the ranks and says how
    to resume as it does on Ctrl-C (by default Python would die without a word)."""
    if threading.current_thread() is not threading.main_thread():  # only it takes signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(config: TrainConfig, *, debug: bool = False) -> int:
    """Train with `config`: under torchrun as this process's rank, else on `nproc` local
    processes. Expected failures are reported in one line each on stderr (`debug`: with the
    ranks' tracebacks). Returns the exit status."""
    if _under_torchrun():
        return _run_under_torchrun(config)
    with _sigterm_unwinds():
        return _run_local(config, debug)


def _run_local(config: TrainConfig, debug: bool) -> int:
    # This process only checks folders and watches the ranks: it imports no torch before the
    # ranks start (see fastpar.launch). Several ranks are forked from a server that imported
    # the training code once for all of them; one is spawned, since the server would only add
    # its own exit (seconds with torch loaded, which a caller reading our output waits for).
    from fastpar.launch import FORKSERVER_PRELOAD, RankFailure, spawn_ranks, stop_fork_server
    from fastpar.training.checkpoint import CheckpointError
    from fastpar.training.metrics_folder import MetricsFolderError

    # torch._dynamo: torch.optim imports it at the first optimizer (add_param_group is wrapped
    # by torch._disable_dynamo), with or without torch.compile.
    preload = (*FORKSERVER_PRELOAD, "fastpar.training.loop", "torch._dynamo")
    try:
        resume = prepare(config)
        results = spawn_ranks(_train_entry, config.nproc, args=(config, resume), timeout=None,
                              group_timeout=config.timeout_s, backend="auto",
                              start_method="forkserver" if config.nproc > 1 else "spawn",
                              preload=preload)  # fmt: skip
    except (CheckpointError, MetricsFolderError) as error:
        print(f"fastpar train: {error}", file=sys.stderr)
        return 1
    except RankFailure as failure:
        lines = [str(failure)] if debug else _failure_lines(failure.summary)
        print("\nfastpar train stopped:", *lines, sep="\n", file=sys.stderr)
        advice = ["the other ranks were stopped"]
        # A refused or unreadable checkpoint says what to do; after a failed save, the newest
        # checkpoint before it is where to continue.
        if not any("CheckpointError: " in line and "could not write checkpoint" not in line
                   for line in lines):  # fmt: skip
            advice.append(_resume_hint(config))
        if not debug:
            advice.append("--debug shows the tracebacks")
        print("; ".join(advice) + ".", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nfastpar train: interrupted; all ranks were stopped; {_resume_hint(config)}.",
              file=sys.stderr)  # fmt: skip
        return 130
    except _Terminated:
        print(f"\nfastpar train: terminated (SIGTERM); all ranks were stopped; "
              f"{_resume_hint(config)}.", file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM
    finally:  # the ranks are stopped: the server's exit would only hold our output open
        stop_fork_server()
    if results[0] is not None:
        _print_summary(results[0])
    return 0


def restarted_config(
    config: TrainConfig, restarts: int, *, job: str | None, attempt: int = 1
) -> TrainConfig:
    """The options of torchrun's job `job` (`job_id`) after `restarts` counted restarts, in
    attempt `attempt` on torchrun's store (`join_attempt`: above 1 after a restart torchrun
    did not count). Where its first attempt was let in (the checkpoint folder records `job`:
    `prepare`) and this attempt is known to be a later one, it continues from its last
    checkpoint or, with none yet, starts over in folders that hold only its first attempt's
    files. Elsewhere it keeps the user's options, so a first attempt's refusal (folders holding
    another run's checkpoints or metrics) stops every restart too.

    Raises:
        CheckpointError: `--overwrite` would delete checkpoints that the folder records as this
            job's, while nothing tells whether this attempt is the job's first: a new store
            serves it (its host moved, or rank 0 hosts one per attempt) and torchrun counted no
            restart. Deleting them could lose the job's own work: it refuses.
    """
    from fastpar.training import checkpoint
    from fastpar.training.checkpoint import CheckpointError

    root = config.checkpoint_dir
    if job is None or checkpoint.recorded_job(root) != job:
        return config
    if restarts == 0 and attempt == 1:
        if config.overwrite and checkpoint.list_steps(root):
            raise CheckpointError(
                f"--overwrite: {root} holds checkpoints of torchrun job {job!r}, which this is, "
                "and this attempt may be a restart that torchrun did not count (a node joined, "
                "on a new store), so they are kept: pass --resume to continue them, or delete "
                "them (or choose another --checkpoint-dir or --rdzv-id) to start over"
            )
        return config
    if checkpoint.list_steps(root):
        return dataclasses.replace(config, resume=True, overwrite=False)
    if config.resume:  # nothing to continue: prepare says so
        return config
    return dataclasses.replace(config, overwrite=True)


def _run_under_torchrun(config: TrainConfig) -> int:
    import torch.distributed as dist

    from fastpar.launch import destroy_group
    from fastpar.training.checkpoint import CheckpointError

    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store, attempt = _init_under_torchrun(config.timeout_s)
    try:
        resume, config = _prepare_under_torchrun(config, restarts, store, attempt)
        # A checkpoint of other options is refused by every rank as it restores.
        summary = _train_entry(dist.get_rank(), dist.get_world_size(), config, resume)
    except CheckpointError as error:  # on every rank alike: they all reach the barrier
        if dist.get_rank() == 0:
            print(f"fastpar train: {error}", file=sys.stderr)
        destroy_group(after_every_rank=True)
        return 1
    except BaseException:  # as a spawned rank that failed: its peers are not waited for
        destroy_group()
        raise
    destroy_group(after_every_rank=True)
    if summary is not None:
        _print_summary(summary)
    return 0
