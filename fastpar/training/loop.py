"""One rank of `fastpar train`, in named steps: place the rank in the layout (`ParallelDims`),
build and wrap its stage (`build_stage`), return to a checkpoint (`restore`), train
(`run_steps`, which checkpoints), and on rank 0 assemble the model and report validation loss,
throughput and a generated sample.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar.parallel import DataParallel, Pipeline
from fastpar.profiling import record_range
from fastpar.training.batches import Batches
from fastpar.training.checkpoint import Found
from fastpar.training.config import TrainConfig
from fastpar.training.corpus import VOCAB_SIZE, load_corpus, num_windows, windows
from fastpar.training.model import build_model, generate, stage_bounds
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import restore, save_checkpoint

# Fault injection for the tests: "RANK:STEP" makes that rank kill itself at that step.
KILL_ENV = "FASTPAR_TEST_KILL_AT"


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


class _Progress:
    """A one-line progress display on rank 0: step, loss, tokens/s, ETA."""

    def __init__(self, total: int, first: int, enabled: bool) -> None:
        self.total, self.first, self.enabled = total, first, enabled
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.first
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        width = 24
        filled = int(width * (step + 1) / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step + 1}/{self.total}  "
                f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s  ETA {eta:4.0f}s")  # fmt: skip
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


def _maybe_die(rank: int, step: int) -> None:
    target = os.environ.get(KILL_ENV)
    # Once per job: a run that torchrun restarted must get past the step that killed it.
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if target and target == f"{rank}:{step}" and first_attempt:
        os.kill(os.getpid(), 9)


def _global_mean(values: list[float], counts: list[int]) -> float:
    """Mean of per-step losses over the ranks that have them (the last stages), a collective."""
    total = torch.tensor([sum(v * c for v, c in zip(values, counts, strict=True)),
                          float(sum(counts))], dtype=torch.float64)  # fmt: skip
    dist.all_reduce(total)
    return (total[0] / total[1]).item() if total[1] > 0 else math.nan


@dataclass(eq=False)
class Stage:
    """This rank's part of the model and what trains it."""

    model: nn.Sequential  # the whole model (only this stage's layers train here)
    module: nn.Sequential  # this stage's layers, named by their index in the whole model
    runner: nn.Module  # what a step calls: module, or DataParallel over it
    dp: DataParallel | None
    pipe: Pipeline | None
    optimizer: torch.optim.Optimizer


def build_stage(config: TrainConfig, place: RankPlace, device: torch.device) -> Stage:
    """The seeded model, cut to this rank's stage and wrapped for its replicas and pipeline
    (collective over the data-parallel and pipeline groups)."""
    model = build_model(vocab=VOCAB_SIZE, embed=config.embed, hidden=config.hidden,
                        layers=config.layers, backend=config.backend, seed=config.seed)  # fmt: skip
    model.to(device)
    start, end = stage_bounds(len(model), place.dims.pp)[place.stage]
    # Full-model names ("2.module.weight_ih_l0"): a checkpoint does not depend on the layout.
    module = nn.Sequential(OrderedDict((str(i), model[i]) for i in range(start, end)))
    runner: nn.Module = module
    dp = pipe = None
    if place.dims.dp > 1:
        dp = DataParallel(module, group=place.dp_group, comm=config.comm,
                          timeout=config.timeout_s)  # fmt: skip
        runner = dp
    if place.dims.pp > 1:
        pipe = Pipeline(runner, stage_index=place.stage, num_stages=place.dims.pp,
                        group=place.pp_group, loss_fn=_cross_entropy,
                        schedule=config.schedule, num_microbatches=config.microbatches,
                        timeout_s=config.timeout_s)  # fmt: skip
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr)
    return Stage(model, module, runner, dp, pipe, optimizer)


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
        result = stage.pipe.step(inputs if place.stage == 0 else None,
                                 targets if place.is_last_stage else None)  # fmt: skip
        value = result.item() if result is not None else None
    with record_range("fastpar.train.optimizer"):
        stage.optimizer.step()
    return value


def run_steps(config: TrainConfig, place: RankPlace, stage: Stage, batches: Batches,
              text: torch.Tensor, first_step: int) -> float:  # fmt: skip
    """Steps first_step .. config.steps - 1, with progress and checkpoints; returns tokens/s."""
    device = next(stage.module.parameters()).device
    progress = _Progress(config.steps, first_step, enabled=place.rank == 0)
    window_losses: list[float] = []
    window_counts: list[int] = []
    tokens_seen = 0
    run_start = time.perf_counter()
    with _profiler(config, place.rank) as prof:
        for step in range(first_step, config.steps):
            _maybe_die(place.rank, step)
            step_start = time.perf_counter()
            with record_range("fastpar.train.step"):
                indices, global_samples = batches.next()
                inputs, targets = windows(text, indices, config.seq_len)
                share = len(indices) * place.dims.dp / global_samples
                loss = _train_step(stage, place, inputs.to(device), targets.to(device), share)
            if batches.dynamic is not None:
                elapsed = time.perf_counter() - step_start
                compute_s = elapsed - (stage.dp.last_comm_wait_s if stage.dp is not None else 0.0)
                batches.dynamic.record_step(len(indices), compute_s, loss=loss)
            if prof is not None:
                prof.step()
            tokens_seen += global_samples * config.seq_len
            if loss is not None:
                window_losses.append(loss)
                window_counts.append(len(indices))
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                mean = _global_mean(window_losses, window_counts)
                progress.update(step, mean, tokens_seen / (time.perf_counter() - run_start))
                window_losses, window_counts = [], []
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(config, step + 1, place, stage.module, stage.optimizer, batches)
    progress.close()
    elapsed_run = time.perf_counter() - run_start
    return tokens_seen / elapsed_run if elapsed_run > 0 else 0.0


def train_rank(config: TrainConfig, resume: Found | None = None) -> dict[str, Any] | None:
    """Runs training on this rank (torch.distributed already initialised).

    Arguments:
        config: the run's options, the same on every rank.
        resume: the checkpoint to continue from (chosen and checked before the ranks start,
            the same on every rank); None starts at step 0.

    Returns:
        On rank 0 a summary (validation loss, tokens/s, sample text, steps); None elsewhere.
    """
    dims = config.layout(dist.get_world_size())
    place = dims.build(dist.get_rank(), config.timeout_s)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    stage = build_stage(config, place, _device())
    batches = Batches(config, place, num_windows(corpus.train, config.seq_len))
    try:
        first_step = 0
        if resume is not None:
            first_step = restore(config, resume, stage.module, stage.optimizer, batches)
        tokens_per_s = run_steps(config, place, stage, batches, corpus.train, first_step)
        model = _assemble_on_rank0(place, stage)
    finally:
        if stage.dp is not None:
            stage.dp.close()
    if model is None:
        return None
    return _summarize(config, model, corpus.validation, tokens_per_s, first_step)


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
def _summarize(config: TrainConfig, model: nn.Sequential, validation: torch.Tensor,
               tokens_per_s: float, first_step: int) -> dict[str, Any]:  # fmt: skip
    model.eval()
    count = num_windows(validation, config.seq_len)
    batches = min(config.validation_batches, max(1, count // config.batch_size))
    losses = []
    for b in range(batches):
        indices = list(range(b * config.batch_size, min((b + 1) * config.batch_size, count)))
        inputs, targets = windows(validation, indices, config.seq_len)
        losses.append(_cross_entropy(model(inputs), targets).item())
    prompt = b"def "
    sample = generate(model, prompt, config.sample_bytes, config.seq_len, seed=config.seed)
    return {
        "validation_loss": sum(losses) / len(losses),
        "tokens_per_s": tokens_per_s,
        "sample": (prompt + sample).decode("utf-8", errors="replace"),
        "steps": config.steps,
        "resumed_from": first_step,
    }
