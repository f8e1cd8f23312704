"""Faults a test (or a demonstration) injects into `fastpar train` through the environment.

- FASTPAR_TEST_KILL_AT="RANK:STEP": that rank kills itself at that step (once per job).
- FASTPAR_TEST_SLOW="RANK:FIRST:LAST:MS": that rank becomes a straggler in steps FIRST..LAST-1,
  spending MS milliseconds of extra compute per sample of its block (it spins, holding its
  core as a slow worker would), inside the step that the slicer and the executors time.
- FASTPAR_TEST_NOISE="FIRST:LAST": steps FIRST..LAST-1 train on random bytes, so the loss
  spikes (what the "loss" slicing policy reacts to).
"""

from __future__ import annotations

import os
import time

import torch

KILL_ENV = "FASTPAR_TEST_KILL_AT"
SLOW_ENV = "FASTPAR_TEST_SLOW"
NOISE_ENV = "FASTPAR_TEST_NOISE"


def _fields(name: str, count: int) -> list[float] | None:
    value = os.environ.get(name)
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != count:
        raise ValueError(f"{name} must hold {count} numbers separated by ':', got {value!r}")
    return [float(part) for part in parts]


def maybe_die(rank: int, step: int) -> None:
    """Kill this process at the step KILL_ENV names for it, on the job's first attempt only:
    a run that torchrun restarted must get past the step that killed it."""
    target = os.environ.get(KILL_ENV)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if target and target == f"{rank}:{step}" and first_attempt:
        os.kill(os.getpid(), 9)


def maybe_straggle(rank: int, step: int, samples: int) -> None:
    """Spin for SLOW_ENV's extra compute when it names this rank and step."""
    fields = _fields(SLOW_ENV, 4)
    if fields is None:
        return
    slow_rank, first, last, ms = fields
    if rank == slow_rank and first <= step < last:
        until = time.perf_counter() + ms * 1e-3 * samples
        while time.perf_counter() < until:
            pass


def maybe_noise(step: int, inputs: torch.Tensor, targets: torch.Tensor, vocab: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random bytes instead of the text in NOISE_ENV's steps (the same on every rank)."""
    fields = _fields(NOISE_ENV, 2)
    if fields is None or not fields[0] <= step < fields[1]:
        return inputs, targets
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randint(vocab, (inputs.shape[0], inputs.shape[1] + 1), generator=generator)
    return noise[:, :-1], noise[:, 1:]
