"""One rank of `fastpar train`: builds its part of the model, trains, checkpoints, and on rank 0
reports validation loss, throughput and a generated sample.

Rank layout: rank = replica * stages + stage. Ranks of one replica form a pipeline (its own
process group); ranks of one stage across replicas form a data-parallel group whose gradients
are averaged (`DataParallel`). dp is replicas x 1 stage, pp is 1 replica x stages.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastpar.data import DynamicSlicer, FixedSlicer
from fastpar.parallel import DataParallel, Pipeline
from fastpar.profiling import record_range
from fastpar.training import checkpoint
from fastpar.training.config import TrainConfig
from fastpar.training.corpus import VOCAB_SIZE, load_corpus, num_windows, windows
from fastpar.training.model import build_model, generate, stage_bounds

# Fault injection for the tests: "RANK:STEP" makes that rank kill itself at that step.
KILL_ENV = "FASTPAR_TEST_KILL_AT"


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    replicas: int
    stages: int
    replica: int
    stage: int
    dp_group: dist.ProcessGroup | None  # None when there is one replica
    pp_group: dist.ProcessGroup | None  # None when there is one stage

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1


def make_layout(config: TrainConfig) -> Layout:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    replicas, stages = config.layout(world_size)
    replica, stage = divmod(rank, stages)
    dp_group = pp_group = None
    # new_group is collective: every rank creates every group, in the same order.
    if replicas > 1:
        for s in range(stages):
            group = dist.new_group([r * stages + s for r in range(replicas)])
            if s == stage:
                dp_group = group
    if stages > 1:
        for r in range(replicas):
            group = dist.new_group([r * stages + s for s in range(stages)])
            if r == replica:
                pp_group = group
    return Layout(rank, world_size, replicas, stages, replica, stage, dp_group, pp_group)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


class _Batches:
    """This replica's sample indices per step, and the step's global sample count."""

    def __init__(self, config: TrainConfig, layout: Layout, num_samples: int) -> None:
        self.config = config
        self.layout = layout
        self.dynamic: DynamicSlicer | None = None
        if config.slicing == "fixed":
            num_blocks = num_samples // config.batch_size
            if num_blocks < layout.replicas:
                raise ValueError(
                    f"the training text holds {num_samples} windows of --seq-len "
                    f"{config.seq_len}: too few for {layout.replicas} replicas of --batch-size "
                    f"{config.batch_size}; raise --train-bytes"
                )
            self.fixed = FixedSlicer(num_samples, num_blocks, drop_last=True, shuffle=True,
                                     seed=config.seed)  # fmt: skip
            self.shard = self.fixed.shard(layout.replica, layout.replicas)
        else:
            low = max(1, config.batch_size // 4)
            high = config.batch_size * 2
            options: dict[str, Any] = {"min_size": low, "max_size": high, "shuffle": True,
                                       "seed": config.seed, "policy": config.slicing}  # fmt: skip
            if config.slicing == "throughput":
                options["global_batch"] = config.batch_size * layout.replicas
            else:
                options["initial_size"] = config.batch_size
            self.dynamic = DynamicSlicer(num_samples, group=layout.dp_group,
                                         world_size=layout.replicas, **options)  # fmt: skip

    def at(self, step: int) -> tuple[list[int], int]:
        if self.dynamic is not None:
            blocks = self.dynamic.next_step()
            return blocks[self.layout.replica], sum(len(b) for b in blocks)
        per_epoch = len(self.shard)
        epoch = step // per_epoch
        if epoch != self.fixed.epoch:  # set_epoch drops the cached permutation: once per epoch
            self.shard.set_epoch(epoch)
        block = self.fixed.block(self.shard.block_ids[step % per_epoch])
        return block, len(block) * self.layout.replicas

    def state_dict(self) -> dict[str, Any]:
        return self.dynamic.state_dict() if self.dynamic is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.dynamic is not None:
            self.dynamic.load_state_dict(state)


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


def train_rank(config: TrainConfig) -> dict[str, Any] | None:
    """Runs training on this rank (torch.distributed already initialised).

    Returns:
        On rank 0 a summary (validation loss, tokens/s, sample text, steps); None elsewhere.
    """
    layout = make_layout(config)
    corpus = load_corpus(config.train_bytes, config.validation_bytes)
    num_samples = num_windows(corpus.train, config.seq_len)
    model = build_model(vocab=VOCAB_SIZE, embed=config.embed, hidden=config.hidden,
                        layers=config.layers, backend=config.backend, seed=config.seed)  # fmt: skip
    device = _device()
    model.to(device)
    bounds = stage_bounds(len(model), layout.stages)
    start, end = bounds[layout.stage]
    stage_module = nn.Sequential(*list(model)[start:end])
    runner: nn.Module = stage_module
    dp: DataParallel | None = None
    if layout.replicas > 1:
        dp = DataParallel(stage_module, group=layout.dp_group, comm=config.comm)
        runner = dp
    pipe: Pipeline | None = None
    if layout.stages > 1:
        pipe = Pipeline(runner, stage_index=layout.stage, num_stages=layout.stages,
                        group=layout.pp_group, loss_fn=_cross_entropy,
                        schedule=config.schedule, num_microbatches=config.microbatches,
                        timeout_s=config.timeout_s)  # fmt: skip
    optimizer = torch.optim.Adam(stage_module.parameters(), lr=config.lr)
    batches = _Batches(config, layout, num_samples)

    first_step = 0
    shape = [layout.world_size, layout.replicas, layout.stages]
    root = config.checkpoint_dir
    resumed = checkpoint.latest_step(root) if config.resume else None
    if resumed is not None:
        state = checkpoint.load_rank_state(root, resumed, layout.rank)
        if state["layout"] != shape:
            raise ValueError(
                f"checkpoint {root} was written by [ranks, replicas, stages] = "
                f"{state['layout']}; this run is {shape}: resume with the same layout"
            )
        stage_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["slicer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        first_step = state["step"]

    def save(step: int) -> None:
        state = {
            "step": step,
            "layout": shape,
            "model": stage_module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "slicer": batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        checkpoint.save_rank_state(root, step, layout.rank, state)
        dist.barrier()  # every rank's file exists before `latest` moves
        if layout.rank == 0:
            checkpoint.publish(root, step)

    progress = _Progress(config.steps, first_step, enabled=layout.rank == 0)
    window_losses: list[float] = []
    window_counts: list[int] = []
    tokens_seen = 0
    run_start = time.perf_counter()
    with _profiler(config, layout.rank) as prof:
        for step in range(first_step, config.steps):
            _maybe_die(layout.rank, step)
            step_start = time.perf_counter()
            with record_range("fastpar.train.step"):
                indices, global_samples = batches.at(step)
                inputs, targets = windows(corpus.train, indices, config.seq_len)
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad(set_to_none=True)
                if pipe is None:
                    loss = _cross_entropy(runner(inputs), targets)
                    # DataParallel averages over replicas: weighting by this block's share keeps
                    # the gradient the mean over the global batch when blocks differ in size.
                    (loss * (len(indices) * layout.replicas / global_samples)).backward()
                    loss_value: float | None = loss.item()
                else:
                    result = pipe.step(inputs if layout.stage == 0 else None,
                                       targets if layout.is_last_stage else None)  # fmt: skip
                    loss_value = result.item() if result is not None else None
                with record_range("fastpar.train.optimizer"):
                    optimizer.step()
            elapsed = time.perf_counter() - step_start
            if batches.dynamic is not None:
                compute_s = elapsed - (dp.last_comm_wait_s if dp is not None else 0.0)
                batches.dynamic.record_step(len(indices), compute_s, loss=loss_value)
            if prof is not None:
                prof.step()
            tokens_seen += global_samples * config.seq_len
            if loss_value is not None:
                window_losses.append(loss_value)
                window_counts.append(len(indices))
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                mean = _global_mean(window_losses, window_counts)
                tokens_per_s = tokens_seen / (time.perf_counter() - run_start)
                progress.update(step, mean, tokens_per_s)
                window_losses, window_counts = [], []
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save(step + 1)
    progress.close()
    elapsed_run = time.perf_counter() - run_start
    tokens_per_s = tokens_seen / elapsed_run if elapsed_run > 0 else 0.0

    # Rank 0 assembles the whole model from the first replica's stages for evaluation.
    states: list[Any] = [None] * layout.world_size
    mine = stage_module.state_dict() if layout.replica == 0 else None
    dist.gather_object(mine, states if layout.rank == 0 else None, dst=0)
    if dp is not None:
        dp.close()
    if layout.rank != 0:
        return None
    for stage, (begin, finish) in enumerate(bounds):
        # A Sequential over the model's own layers: loading into it loads into `model`.
        nn.Sequential(*list(model)[begin:finish]).load_state_dict(states[stage])
    model.cpu()
    return _summarize(config, model, corpus.validation, tokens_per_s, first_step)


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
