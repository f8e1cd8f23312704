"""Fixed-size slicing: n samples cut into k blocks of (almost) equal size.

Glossary: n samples, k blocks, m = n // k samples per block, r = n - k * m remainder,
W ranks (world size).

`FixedSlicer` yields lists of sample indices, one per block, so it can be handed to
`torch.utils.data.DataLoader(batch_sampler=...)` directly; `shard(rank, world_size)` is the
per-rank view for data-parallel training (every rank gets the same number of blocks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fastpar._checks import MAX_SHUFFLE_SEED, check_bool, check_int


class FixedSlicer:
    """Cuts `num_samples` indices into `num_blocks` blocks of m = num_samples // num_blocks.

    The r = num_samples - num_blocks * m samples left over go one each to the first r blocks
    (so block sizes differ by at most one), or are dropped with `drop_last` (every block then
    has exactly m samples). Without `shuffle`, block i is a contiguous index range and blocks
    follow each other in order; with `shuffle`, the indices are first permuted by a generator
    seeded with `seed + epoch` (see `set_epoch`), so every epoch has its own permutation and
    every process computes the same one. With `shuffle` and `drop_last`, the dropped samples
    are the last r of that epoch's permutation, so they change from epoch to epoch.

    Iterating yields one list of indices per block (`len()` blocks), which makes the slicer a
    DataLoader `batch_sampler`.

    Arguments:
        num_samples: n, the number of samples (indices 0 .. n-1), >= 1.
        num_blocks: k, the number of blocks, in [1, n].
        drop_last: drop the remainder instead of spreading it over the first blocks.
        shuffle: permute the indices every epoch before cutting them into blocks.
        seed: base seed of the permutation (the epoch is added to it).
    """

    def __init__(
        self,
        num_samples: int,
        num_blocks: int,
        *,
        drop_last: bool = False,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.num_blocks = check_int("num_blocks", num_blocks, 1)
        if num_blocks > num_samples:
            raise ValueError(
                f"num_blocks ({num_blocks}) must not exceed num_samples ({num_samples}): "
                "every block needs at least one sample"
            )
        self.seed = check_int("seed", seed, 0, MAX_SHUFFLE_SEED)
        # A flag read from a config file as the string "false" must not turn it on.
        self.drop_last = check_bool("drop_last", drop_last)
        self.shuffle = check_bool("shuffle", shuffle)
        self.epoch = 0
        base, remainder = divmod(num_samples, num_blocks)
        extra = 0 if drop_last else remainder
        self.block_sizes: tuple[int, ...] = tuple(
            base + (1 if i < extra else 0) for i in range(num_blocks)
        )
        # Block i starts at offsets[i] of the (possibly permuted) epoch order.
        self._offsets = [0]
        for size in self.block_sizes:
            self._offsets.append(self._offsets[-1] + size)
        self._order: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the blocks use (like DistributedSampler); a pass
        already under way keeps the permutation it started with.

        Arguments:
            epoch: the epoch number, >= 0; only matters with `shuffle`.
        """
        self.epoch = check_int("epoch", epoch, 0)
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.num_samples, generator=generator)
            else:
                self._order = torch.arange(self.num_samples)
        return self._order

    def block(self, index: int) -> list[int]:
        """The sample indices of block `index` in the current epoch.

        Arguments:
            index: block number in [0, num_blocks).

        Returns:
            block_sizes[index] sample indices.
        """
        check_int("index", index, 0, self.num_blocks - 1)
        order = self._epoch_order()
        return order[self._offsets[index] : self._offsets[index + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return self._blocks(range(self.num_blocks))

    def _blocks(self, block_ids: Sequence[int]) -> Iterator[list[int]]:
        # The order is taken when iteration starts, as DistributedSampler takes its indices: a
        # set_epoch during a pass applies to the next pass instead of mixing two permutations
        # in this one (samples seen twice or never).
        order = self._epoch_order()
        return (order[self._offsets[i] : self._offsets[i + 1]].tolist() for i in block_ids)

    def __len__(self) -> int:
        return self.num_blocks

    def shard(self, rank: int, world_size: int) -> FixedShard:
        """The blocks of one rank out of `world_size`, for data-parallel training.

        Blocks are dealt round-robin (rank r gets blocks r, r + W, r + 2W, ...), the way
        DistributedSampler deals samples, so every rank gets ceil(k / W) blocks. When k is not
        a multiple of W, the same convention as DistributedSampler applies to whole blocks:
        without `drop_last`, the list of blocks is padded by repeating blocks from its start
        (those samples are then seen twice in the epoch); with `drop_last`, the last k mod W
        blocks are dropped and every rank gets k // W blocks.

        Arguments:
            rank: this rank, in [0, world_size).
            world_size: W, the number of ranks, >= 1.

        Returns:
            A view that shares this slicer's epoch (its `set_epoch` sets the slicer's).

        Raises:
            ValueError: bad rank or world size, or `drop_last` with fewer blocks than ranks
                (every rank would get nothing).
        """
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0, world_size - 1)
        if self.drop_last:
            per_rank = self.num_blocks // world_size
            if per_rank == 0:
                raise ValueError(
                    f"num_blocks ({self.num_blocks}) < world_size ({world_size}) with "
                    "drop_last: every rank would get no block"
                )
        else:
            per_rank = -(-self.num_blocks // world_size)
        dealt = [i % self.num_blocks for i in range(per_rank * world_size)]
        return FixedShard(self, dealt[rank::world_size])


class FixedShard:
    """One rank's blocks of a FixedSlicer; iterate it or pass it as a DataLoader batch_sampler.

    Made by `FixedSlicer.shard`; see there for how blocks are dealt to ranks.

    Arguments:
        slicer: the slicer whose blocks (and epoch) this view shares.
        block_ids: the block numbers of this rank, in the order they are yielded.
    """

    def __init__(self, slicer: FixedSlicer, block_ids: list[int]) -> None:
        self.slicer = slicer
        self.block_ids = tuple(block_ids)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the underlying slicer (so all views of it move together).

        Arguments:
            epoch: the epoch number, >= 0.
        """
        self.slicer.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return self.slicer._blocks(self.block_ids)

    def __len__(self) -> int:
        return len(self.block_ids)
