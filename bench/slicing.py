"""Straggler benchmark: fixed vs throughput slicing, 2 CPU processes, one rank slowed 2x.

Each process trains the same 2-layer LSTM language model on its own block of every step;
gradients are summed with torch.distributed (gloo) and every step is synchronous, so the step
takes as long as the slowest rank. Rank 1 is slowed 2x by an injected delay per sample (equal to
the measured compute time per sample). Scenarios, measured in the same run and interleaved in
rounds so that load from other processes hits them alike:

- baseline: no delay, fixed slicing (equal halves of the global batch);
- fixed: rank 1 slowed, fixed slicing: the fast rank waits for the slow one;
- throughput: rank 1 slowed, DynamicSlicer(policy="throughput") shares the global batch by the
  measured samples/second of each rank;
- oracle: rank 1 slowed, a static 2 : 1 split (the best split for an exact 2x straggler).

With per-rank rates r and r / 2, no slicing can beat r + r / 2 = 0.75x the baseline: the slow
rank's lost capacity is gone. So "recovered" is reported against that balanced ideal (the
throughput fixed slicing loses that slicing can win back) and, for reference, against the
unslowed baseline (at most (0.75 - 0.5) / (1 - 0.5) = 50% for a 2x straggler on 2 ranks).

    python bench/slicing.py [--rounds 8] [--steps 10] [--csv results/slicing.csv]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import LSTMLanguageModel, device_name, format_table, write_csv

from fastpar.data import DynamicSlicer, FixedSlicer
from fastpar.testing.distributed import run_multiprocess

WORLD_SIZE = 2
SLOW_RANK = 1
SCENARIOS = ("baseline", "fixed", "throughput", "oracle")
HEADERS = (
    "device", "scenario", "rank_blocks", "step_ms", "p20_ms", "p80_ms", "samples_per_s",
    "vs_baseline",
)  # fmt: skip


class Trainer:
    """One rank's model, data and synchronous data-parallel step."""

    def __init__(self, rank: int, args: argparse.Namespace, num_samples: int) -> None:
        torch.manual_seed(0)  # same initial parameters on every rank
        self.rank = rank
        self.model = LSTMLanguageModel(args.vocab, args.embedding, args.hidden, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(
            args.vocab, (num_samples, args.seq_len + 1), generator=generator
        )
        self.delay_per_sample = 0.0

    def step(self, indices: list[int], global_size: int, slowed: bool) -> float:
        """Train on this rank's block; returns the compute seconds (before the all-reduce).

        The loss is summed over the block and divided by the global batch's token count, so
        the all-reduced sum of gradients is the gradient of the global batch's mean loss. The
        all-reduce comes after the timing on purpose: the throughput slicer must see each
        rank's own compute, and DataParallel's backward would include the wait for the slow
        peer.
        """
        start = time.perf_counter()
        batch = self.tokens[indices]
        logits = self.model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        loss = loss / (global_size * (batch.shape[1] - 1))
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        if slowed and self.rank == SLOW_RANK:
            # The injected straggler delay spins rather than sleeps: a slow worker still holds
            # its core, so the other rank does not run faster on a shared machine meanwhile.
            until = time.perf_counter() + self.delay_per_sample * len(indices)
            while time.perf_counter() < until:
                pass
        compute = time.perf_counter() - start
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:  # the sums back into .grad
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        self.optimizer.step()
        return compute


def _rank_main(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, object]:
    half = args.global_batch // 2
    steps_per_run = args.warmup + args.steps
    runs = args.rounds * steps_per_run
    # Enough samples that no scenario reaches the end of an epoch: every step is a full one.
    num_samples = args.global_batch * (2 * runs + args.calibrate + 1)
    trainer = Trainer(rank, args, num_samples)
    fixed = FixedSlicer(num_samples, num_samples // half).shard(rank, world_size)
    blocks = iter(fixed)

    # Calibration: compute seconds per sample without delay; both ranks use the mean, so the
    # slow rank's delay doubles the compute time of the ranks' typical sample.
    costs = [
        trainer.step(next(blocks), args.global_batch, False) / half for _ in range(args.calibrate)
    ]
    cost = torch.tensor([statistics.median(costs[1:])], dtype=torch.float64)
    dist.all_reduce(cost)
    trainer.delay_per_sample = cost.item() / world_size

    throughput = DynamicSlicer(
        num_samples, min_size=2, max_size=args.global_batch - 2, global_batch=args.global_batch
    )
    oracle_sizes = [args.global_batch * 2 // 3, args.global_batch - args.global_batch * 2 // 3]
    oracle_cursor = 0
    times: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    sizes: dict[str, list[int]] = {name: [] for name in SCENARIOS}
    for _ in range(args.rounds):
        for name in SCENARIOS:
            dist.barrier()
            for step in range(steps_per_run):
                start = time.perf_counter()
                if name == "throughput":
                    step_blocks = throughput.next_step()
                    indices = step_blocks[rank]
                    compute = trainer.step(indices, args.global_batch, True)
                    throughput.record_step(len(indices), compute)
                elif name == "oracle":
                    offset = oracle_cursor + sum(oracle_sizes[:rank])
                    indices = list(range(offset, offset + oracle_sizes[rank]))
                    oracle_cursor += args.global_batch
                    trainer.step(indices, args.global_batch, True)
                else:
                    indices = next(blocks)
                    trainer.step(indices, args.global_batch, name == "fixed")
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    sizes[name].append(len(indices))
    return {"times": times, "sizes": sizes, "delay": trainer.delay_per_sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds of scenarios")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per round")
    parser.add_argument("--calibrate", type=int, default=8, help="steps measuring compute")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in each rank (run_multiprocess), so device_name says so
    results = run_multiprocess(_rank_main, WORLD_SIZE, args=(args,), timeout=600)

    # Synchronous steps: rank 0's step times are the job's.
    rows, throughput = [], {}
    for name in SCENARIOS:
        samples = sorted(results[0]["times"][name])
        deciles = statistics.quantiles(samples, n=10)
        median = statistics.median(samples)
        throughput[name] = args.global_batch / median
        blocks = "/".join(str(round(statistics.median(r["sizes"][name]))) for r in results)
        rows.append(
            [
                device_name(),
                name,
                blocks,
                median * 1e3,
                deciles[1] * 1e3,
                deciles[7] * 1e3,
                throughput[name],
                throughput[name] / throughput["baseline"],
            ]
        )
    if args.csv is not None:
        write_csv(args.csv, HEADERS, rows)
    print(format_table(HEADERS, rows))
    fixed, dynamic = throughput["fixed"], throughput["throughput"]
    references = {
        "balanced ideal, 0.75x baseline (goal >= 70%)": 0.75 * throughput["baseline"],
        "oracle 2:1 split, measured": throughput["oracle"],
        "unslowed baseline (at most 50% on an idle machine)": throughput["baseline"],
    }
    delay_ms = results[SLOW_RANK]["delay"] * 1e3
    print(f"\ninjected delay on rank {SLOW_RANK}: {delay_ms:.3f} ms per sample")
    print("share of the throughput lost by fixed slicing that throughput slicing wins back:")
    for label, reference in references.items():
        print(f"  vs {label}: {(dynamic - fixed) / (reference - fixed):.0%}")


if __name__ == "__main__":
    main()
