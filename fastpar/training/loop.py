"""One rank of `fastpar train`, in named steps: place the rank in the layout (`ParallelDims`),
build and wrap its stage (`build_stage`), return to a checkpoint (`restore`), train
(`run_steps`, which checkpoints and records every step's metrics), and on rank 0 assemble the
model and report validation loss, throughput and a generated sample.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar.parallel import CommStats, DataParallel, Pipeline
from fastpar.parallel.pipeline.schedules import Placement
from fastpar.parallel.pipeline.stages import measured_cuts, split_sequential
from fastpar.profiling import record_range
from fastpar.training.batches import Batches
from fastpar.training.checkpoint import Found
from fastpar.training.config import TrainConfig
from fastpar.training.corpus import VOCAB_SIZE, Corpus, load_corpus, num_windows, windows
from fastpar.training.faults import KILL_ENV, maybe_die, maybe_noise, maybe_straggle
from fastpar.training.metrics import Decision, StepMetrics, progress_notes
from fastpar.training.model import build_model, generate, stage_bounds
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import restore, save_checkpoint, seed_rank_streams

if TYPE_CHECKING:
    from fastpar.training.metrics_files import MetricsWriter

__all__ = ["KILL_ENV", "Stage", "build_stage", "run_steps", "train_rank"]


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


class _Progress:
    """A one-line progress display on rank 0: step, loss, tokens/s, ETA, and the layout's notes
    (blocks, exposed communication, bubble; see `metrics.progress_notes`)."""

    def __init__(self, total: int, first: int, enabled: bool) -> None:
        self.total, self.first, self.enabled = total, first, enabled
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float, notes: str) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.first
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        width = 24
        filled = int(width * (step + 1) / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step + 1}/{self.total}  "
                f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s  {notes + '  ' if notes else ''}"
                f"ETA {eta:4.0f}s")  # fmt: skip
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(flush=True)


@contextlib.contextmanager
def _profiler(config: TrainConfig, rank: int) -> Iterator[Any]:
    if config.profile_dir is None:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    config.profile_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    path = config.profile_dir / f"trace-rank{rank}.json"
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(str(path)),
    ) as prof:
        yield prof


@dataclass(eq=False)
class Stage:
    """This rank's part of the model and what trains it."""

    model: nn.Sequential  # the whole model (only this stage's layers train here)
    module: nn.Sequential  # this stage's layers, named by their index in the whole model
    runner: nn.Module  # what a step calls without a pipeline: module, or DataParallel over it
    dps: list[DataParallel]  # one per chunk when replicated, else empty
    pipe: Pipeline | None
    optimizer: torch.optim.Optimizer


def build_stage(config: TrainConfig, place: RankPlace, device: torch.device) -> Stage:
    """The seeded model, cut to this rank's stage and wrapped for its replicas and pipeline
    (collective over the data-parallel and pipeline groups)."""
    model = build_model(vocab=VOCAB_SIZE, embed=config.embed, hidden=config.hidden,
                        layers=config.layers, backend=config.backend, seed=config.seed,
                        cell=config.cell)  # fmt: skip
    model.to(device)
    num_stages = config.num_stages(place.dims.pp)
    bounds = stage_bounds(len(model), num_stages)
    if num_stages > 1 and config.balance == "auto":
        bounds = _balanced_bounds(model, num_stages, config, device)
    mine = (0,)
    if place.dims.pp > 1:
        mine = Placement.of(config.schedule, place.dims.pp, num_stages).stages_of(place.stage)
    # The stages keep the full model's names ("2.module.weight_ih_l0"), so a checkpoint does
    # not depend on the layout.
    stages = split_sequential(model, [start for start, _ in bounds[1:]])
    chunks = [stages[s] for s in mine]
    module = nn.Sequential(OrderedDict(kv for chunk in chunks for kv in chunk.named_children()))
    runners: list[nn.Module] = list(chunks)
    dps: list[DataParallel] = []
    if place.dims.dp > 1:
        dps = [DataParallel(chunk, group=place.dp_group, comm=config.comm,
                            timeout=config.timeout_s) for chunk in chunks]  # fmt: skip
        runners = list(dps)
    pipe = None
    if place.dims.pp > 1:
        pipe = Pipeline(runners[0] if len(runners) == 1 else runners,
                        stage_index=mine[0] if len(mine) == 1 else list(mine),
                        num_stages=num_stages, group=place.pp_group, loss_fn=_cross_entropy,
                        schedule=config.schedule, num_microbatches=config.microbatches,
                        timeout_s=config.timeout_s)  # fmt: skip
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    return Stage(model, module, runners[0], dps, pipe, optimizer)


def _balanced_bounds(
    model: nn.Sequential, num_stages: int, config: TrainConfig, device: torch.device
) -> list[tuple[int, int]]:
    """--balance auto: rank 0 times every module's forward and backward on a micro-batch of
    random windows and cuts where the slowest stage is fastest; every rank takes its cuts, so
    all replicas and stages agree (timings differ from rank to rank)."""
    cuts: list[list[int] | None] = [None]
    if dist.get_rank() == 0:
        rows = max(1, config.batch_size // config.microbatches)
        generator = torch.Generator().manual_seed(config.seed)
        example = torch.randint(VOCAB_SIZE, (rows, config.seq_len), generator=generator)
        cuts[0] = measured_cuts(model, num_stages, example.to(device))
    dist.broadcast_object_list(cuts, src=0)
    assert cuts[0] is not None
    return list(itertools.pairwise([0, *cuts[0], len(model)]))


def _train_step(
    stage: Stage, place: RankPlace, inputs: torch.Tensor, targets: torch.Tensor, share: float
) -> float | None:
    """Forward, backward and optimizer step; the loss on ranks that compute it."""
    stage.optimizer.zero_grad(set_to_none=True)
    if stage.pipe is None:
        loss = _cross_entropy(stage.runner(inputs), targets)
        # DataParallel averages over replicas: weighting by this block's share keeps the
        # gradient the mean over the global batch when blocks differ in size.
        (loss * share).backward()
        value: float | None = loss.item()
    else:
        # zbv holds the first and the last stage on rank 0.
        result = stage.pipe.step(inputs if stage.pipe.is_first else None,
                                 targets if stage.pipe.is_last else None)  # fmt: skip
        value = result.item() if result is not None else None
    with record_range("fastpar.train.optimizer"):
        stage.optimizer.step()
    return value


def _row(stage: Stage, loss: float | None, samples: int, global_samples: int,
         elapsed: float) -> dict[str, float]:  # fmt: skip
    """This rank's metrics of the step just trained (host-clock times the executors kept)."""
    comm = CommStats.total(d.last_stats for d in stage.dps)
    row = {"loss": float("nan") if loss is None else loss, "samples": samples,
           "global_samples": global_samples, "step_s": elapsed, "allreduce_s": comm.allreduce_s,
           "exposed_s": comm.exposed_s, "forward_s": 0.0, "backward_s": 0.0, "bubble": 0.0,
           # This rank's own compute: the step without the wait for the other replicas.
           "compute_s": elapsed - comm.exposed_s}  # fmt: skip
    if stage.pipe is not None:
        pipe = stage.pipe.last_stats
        row.update(forward_s=pipe.forward_s, backward_s=pipe.backward_s, bubble=pipe.bubble,
                   compute_s=pipe.compute_s)  # fmt: skip
    return row


def run_steps(config: TrainConfig, place: RankPlace, stage: Stage, batches: Batches,
              corpus: Corpus, first_step: int,
              writer: MetricsWriter | None = None) -> tuple[float, StepMetrics]:  # fmt: skip
    """Steps first_step .. config.steps - 1, with progress, metrics and checkpoints.

    Returns:
        (tokens/s, this rank's recorder, which counts the time its recording took).
    """
    device = next(stage.module.parameters()).device
    progress = _Progress(config.steps, first_step, enabled=place.rank == 0)
    metrics = StepMetrics(place)
    tokens_seen = 0
    run_start = time.perf_counter()
    with _profiler(config, place.rank) as prof:
        for step in range(first_step, config.steps):
            maybe_die(place.rank, step)
            step_start = time.perf_counter()
            with record_range("fastpar.train.step"):
                indices, global_samples = batches.next()
                inputs, targets = windows(corpus.train, indices, config.seq_len)
                inputs, targets = maybe_noise(step, inputs, targets, VOCAB_SIZE, config.seed)
                maybe_straggle(place.rank, step, len(indices))
                share = len(indices) * place.dims.dp / global_samples
                loss = _train_step(stage, place, inputs.to(device), targets.to(device), share)
            row = _row(stage, loss, len(indices), global_samples,
                       time.perf_counter() - step_start)  # fmt: skip
            decision = None
            if batches.dynamic is not None:
                blocks = tuple(batches.dynamic.last_sizes)
                batches.dynamic.record_step(len(indices), row["compute_s"], loss)
                decision = Decision(blocks, batches.dynamic.last_stats)
            metrics.record(step, row, decision)
            if prof is not None:
                prof.step()
            tokens_seen += global_samples * config.seq_len
            log = (step + 1) % config.log_every == 0 or step + 1 == config.steps
            checkpoint = (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps
            # With --metrics a checkpoint also closes a window (collective: the same condition
            # on every rank), so the files hold every step a run resumed from it keeps.
            if log or (checkpoint and config.metrics_dir is not None):
                window = metrics.gather()
                if window is not None:
                    if log:
                        rate = tokens_seen / (time.perf_counter() - run_start)
                        notes = progress_notes(window, place)
                        progress.update(step, window.mean_loss(), rate, notes)
                    if writer is not None:
                        writer.write(window)
            if checkpoint:
                if writer is not None:
                    # On disk before the checkpoint exists: a run resumed from it keeps the rows
                    # before its step from the files and never writes them again.
                    writer.flush()
                save_checkpoint(config, step + 1, place, stage.module, stage.optimizer, batches)
                if writer is not None and place.dims.pp == 1 and step + 1 < config.steps:
                    # Rank 0 holds the whole model: a validation point between checkpoints
                    # (the last one comes from the summary).
                    loss_v = validation_loss(config, stage.model, corpus.validation)
                    writer.write_validation(step + 1, loss_v)
                    writer.flush()
    progress.close()
    elapsed_run = time.perf_counter() - run_start
    return (tokens_seen / elapsed_run if elapsed_run > 0 else 0.0), metrics


def train_rank(config: TrainConfig, resume: Found | None = None) -> dict[str, Any] | None:
    """Runs training on this rank (torch.distributed already initialised).

    Arguments:
        config: the run's options, the same on every rank.
        resume: the checkpoint to continue from (chosen and checked before the ranks start,
            the same on every rank); None starts at step 0.

    Returns:
        On rank 0 a summary (validation loss, tokens/s, sample text, steps, and with
        `metrics_dir` the metrics' files and cost); None elsewhere.
    """
    dims = config.layout(dist.get_world_size())
    place = dims.build(dist.get_rank(), config.timeout_s)
    seed_rank_streams(config.seed, place.rank)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    stage = build_stage(config, place, _device())
    batches = Batches(config, place, num_windows(corpus.train, config.seq_len))
    writer = None
    try:
        first_step = 0
        if resume is not None:
            first_step = restore(config, resume, place, stage.module, stage.optimizer, batches)
        if config.metrics_dir is not None and place.rank == 0:
            from fastpar.training.metrics_files import MetricsWriter

            title = (f"fastpar train --parallel {config.parallel} --slicing {config.slicing}, "
                     f"{dims.dp} replica(s) x {dims.pp} stage(s)")  # fmt: skip
            writer = MetricsWriter(config.metrics_dir, dims, config.seq_len, title,
                                   first_step=first_step)  # fmt: skip
        run_start = time.perf_counter()
        tokens_per_s, metrics = run_steps(config, place, stage, batches, corpus, first_step,
                                            writer)  # fmt: skip
        run_s = time.perf_counter() - run_start
        model = _assemble_on_rank0(place, stage)
    except BaseException:
        if writer is not None:  # what the failed run recorded, for whoever looks at it
            with contextlib.suppress(OSError):  # the failure to report is the run's
                writer.flush()
        raise
    finally:
        for dp in stage.dps:
            dp.close()
    if model is None:
        return None
    summary = _summarize(config, model, corpus.validation, tokens_per_s, first_step)
    if writer is not None:
        writer.write_validation(config.steps, summary["validation_loss"])
        summary["metrics"] = {"cost_s": metrics.cost_s + writer.cost_s, "run_s": run_s,
                              "gather_s": metrics.gather_s, "plot": writer.close()}  # fmt: skip
    return summary


def _assemble_on_rank0(place: RankPlace, stage: Stage) -> nn.Sequential | None:
    """Rank 0 gathers the first replica's stages into the whole model (collective)."""
    states: list[Any] = [None] * place.dims.world_size
    mine = stage.module.state_dict() if place.replica == 0 else None
    dist.gather_object(mine, states if place.rank == 0 else None, dst=0)
    if place.rank != 0:
        return None
    merged = {key: value for state in states if state is not None for key, value in state.items()}
    stage.model.load_state_dict(merged)
    return stage.model.cpu()


@torch.no_grad()
def validation_loss(config: TrainConfig, model: nn.Module, validation: torch.Tensor) -> float:
    """Mean loss of the whole model over the first `validation_batches` batches of the
    validation text (the model is left in the mode it was in)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    count = num_windows(validation, config.seq_len)
    batches = min(config.validation_batches, max(1, count // config.batch_size))
    losses = []
    try:
        for b in range(batches):
            indices = list(range(b * config.batch_size, min((b + 1) * config.batch_size, count)))
            inputs, targets = windows(validation, indices, config.seq_len)
            logits = model(inputs.to(device))
            losses.append(_cross_entropy(logits, targets.to(device)).item())
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def _summarize(config: TrainConfig, model: nn.Sequential, validation: torch.Tensor,
               tokens_per_s: float, first_step: int) -> dict[str, Any]:  # fmt: skip
    prompt = b"def "
    sample = generate(model, prompt, config.sample_bytes, config.seq_len, seed=config.seed)
    return {
        "validation_loss": validation_loss(config, model, validation),
        "tokens_per_s": tokens_per_s,
        "sample": (prompt + sample).decode("utf-8", errors="replace"),
        "steps": config.steps,
        "resumed_from": first_step,
    }
