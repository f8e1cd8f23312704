"""Data-parallel training step of a 2-layer LSTM language model: fastpar's DataParallel (ring and
torch.distributed transports; the ring with its buckets in ordinary memory, the default, and
in shared memory) against PyTorch DDP (gloo) and compute alone (no communication, the floor),
measured in the same processes, variants interleaved step by step.

    python bench/data_parallel.py [--ranks 2] [--steps 30] [--csv results/data_parallel.csv]

Exposed communication is (step - compute) / compute: the part of the all-reduce that backward
did not hide.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import LSTMLanguageModel, device_name, format_table, write_csv
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpar.parallel import DataParallel
from fastpar.testing.distributed import run_multiprocess

VOCAB, EMBED, HIDDEN, LAYERS, BATCH, SEQ = 96, 64, 256, 2, 16, 64
HEADERS = ("device", "ranks", "variant", "step_ms", "p20_ms", "p80_ms", "vs_ddp", "exposed_comm")


def _model() -> LSTMLanguageModel:
    return LSTMLanguageModel(VOCAB, EMBED, HIDDEN, LAYERS)


def _rank(rank: int, world_size: int, steps: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    models = {
        "ddp (gloo)": DistributedDataParallel(_model()),
        "fastpar ring": DataParallel(_model(), comm="ring"),
        "fastpar ring, shared buckets": DataParallel(_model(), comm="ring", shared_buckets=True),
        "fastpar torch": DataParallel(_model(), comm="torch"),
    }
    compute_only = DataParallel(_model(), comm="torch")
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=0.01)
        for name, model in [*models.items(), ("compute only", compute_only)]
    }
    generator = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {name: [] for name in optimizers}

    def step(name: str) -> float:
        model = compute_only if name == "compute only" else models[name]
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)
        start = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        if name == "compute only":
            with compute_only.no_sync():
                loss.backward()
        else:
            loss.backward()
        optimizers[name].step()
        return time.perf_counter() - start

    for index in range(steps + 3):
        for name in times:
            torch.distributed.barrier()  # every variant starts its step together on all ranks
            elapsed = step(name)
            if index >= 3:
                times[name].append(elapsed)
    for model in [*models.values(), compute_only]:
        if isinstance(model, DataParallel):
            model.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    results = run_multiprocess(_rank, args.ranks, args=(args.steps,), timeout=1800)
    # A step is as slow as its slowest rank.
    merged = {name: [max(r[name][i] for r in results) for i in range(args.steps)]
              for name in results[0]}  # fmt: skip
    medians = {name: statistics.median(samples) for name, samples in merged.items()}
    compute = medians["compute only"]
    rows = []
    for name, samples in merged.items():
        q = statistics.quantiles(samples, n=10)
        rows.append([
            device_name(), args.ranks, name, medians[name] * 1e3, q[1] * 1e3, q[7] * 1e3,
            medians[name] / medians["ddp (gloo)"], (medians[name] - compute) / compute,
        ])  # fmt: skip
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    print(
        f"LSTM LM: embedding {EMBED}, hidden {HIDDEN}, {LAYERS} layers, batch {BATCH}, "
        f"sequence {SEQ}; median of {args.steps} steps, slowest rank per step"
    )
    print(format_table(HEADERS, rows))


if __name__ == "__main__":
    main()
