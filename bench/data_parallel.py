"""Data-parallel training step of a 2-layer LSTM language model: fastpar's DataParallel (ring and
torch.distributed transports; the ring with its buckets in ordinary memory, the default, and
in shared memory; the ring all-reducing buckets during backward, overlap="on") against PyTorch
DDP (gloo) and compute alone (no communication, the floor), measured in the same processes,
variants interleaved step by step, in an order that rotates every step.

    python bench/data_parallel.py [--ranks 2] [--steps 30] [--csv results/data_parallel.csv]
                                  [--malloc steady|default]

Exposed communication is (step - compute) / compute: the part of the all-reduce that backward
did not hide. exposed_paired is the median over steps of the same ratio taken step by step (a
variant's step i against compute alone's step i, run moments apart in the same rotation), which
a change in the machine's load between steps moves less than the ratio of the medians.

--malloc steady (the default) fixes glibc's trim and mmap thresholds in every rank. Left to
itself, glibc moves them as large blocks come and go and hands freed memory back to the system,
so whether a step pays page faults for its gradients and activations depends on what the step
before it (another variant) freed: compute alone, whose gradients are freed by
zero_grad(set_to_none=True) while DataParallel keeps them in its buckets, measured 10 ms (15 %)
slower than the ring's whole step that way on 2 ranks of 2 cores. "default" keeps glibc's
behaviour.
"""

from __future__ import annotations

import argparse
import ctypes
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
# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64 bits.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
HEADERS = ("device", "ranks", "variant", "step_ms", "p20_ms", "p80_ms", "vs_ddp", "exposed_comm",
           "exposed_paired")  # fmt: skip


def _model() -> LSTMLanguageModel:
    return LSTMLanguageModel(VOCAB, EMBED, HIDDEN, LAYERS)


def _steady_malloc() -> None:
    """Fix glibc's thresholds, so that no variant's frees decide another's page faults: freed
    memory stays in the process, and blocks up to 32 MiB come from its heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        raise RuntimeError(f"--malloc steady needs glibc ({error}); use --malloc default") from None
    for option, value in ((M_TRIM_THRESHOLD, 2**30), (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)):
        if libc.mallopt(option, value) != 1:
            raise RuntimeError(f"mallopt({option}, {value}) failed; use --malloc default")


def _rank(rank: int, world_size: int, steps: int, malloc: str) -> dict[str, list[float]]:
    if malloc == "steady":
        _steady_malloc()
    torch.manual_seed(0)
    models = {
        "ddp (gloo)": DistributedDataParallel(_model()),
        "fastpar ring": DataParallel(_model(), comm="ring"),
        "fastpar ring, shared buckets": DataParallel(_model(), comm="ring", shared_buckets=True),
        "fastpar ring, overlap on": DataParallel(_model(), comm="ring", overlap="on"),
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

    names = list(times)
    for index in range(steps + 3):
        turn = index % len(names)  # no variant always follows the same one
        for name in names[turn:] + names[:turn]:
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
    parser.add_argument("--malloc", choices=("steady", "default"), default="steady",
                        help="glibc's thresholds fixed in each rank, or left to glibc")  # fmt: skip
    args = parser.parse_args()
    results = run_multiprocess(_rank, args.ranks, args=(args.steps, args.malloc), timeout=1800)
    # A step is as slow as its slowest rank.
    merged = {name: [max(r[name][i] for r in results) for i in range(args.steps)]
              for name in results[0]}  # fmt: skip
    medians = {name: statistics.median(samples) for name, samples in merged.items()}
    compute = medians["compute only"]
    rows = []
    for name, samples in merged.items():
        q = statistics.quantiles(samples, n=10)
        alone = merged["compute only"]
        paired = statistics.median((a - b) / b for a, b in zip(samples, alone, strict=True))
        rows.append([
            device_name(), args.ranks, name, medians[name] * 1e3, q[1] * 1e3, q[7] * 1e3,
            medians[name] / medians["ddp (gloo)"], (medians[name] - compute) / compute, paired,
        ])  # fmt: skip
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    print(
        f"LSTM LM: embedding {EMBED}, hidden {HIDDEN}, {LAYERS} layers, batch {BATCH}, "
        f"sequence {SEQ}; median of {args.steps} steps, slowest rank per step; "
        f"malloc {args.malloc}"
    )
    print(format_table(HEADERS, rows))


if __name__ == "__main__":
    main()
