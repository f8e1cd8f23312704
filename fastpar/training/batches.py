"""Which training windows each replica takes at each step, and the data position a checkpoint
records: the epoch, the count of samples the whole run consumed in it and the shuffle seed.
That position means the same on any number of replicas, so a run resumes on another layout at
the sample where it stopped.
"""

from __future__ import annotations

from typing import Any

from fastpar.data import DynamicSlicer, FixedSlicer
from fastpar.training.config import TrainConfig
from fastpar.training.parallel_dims import RankPlace


def dynamic_options(config: TrainConfig, replicas: int) -> dict[str, Any]:
    """The DynamicSlicer options of `--slicing throughput|loss` with `replicas` replicas: blocks
    between a quarter and twice --batch-size; "throughput" shares --batch-size x replicas,
    "loss" starts every replica at --batch-size."""
    options: dict[str, Any] = {
        "min_size": max(1, config.batch_size // 4),
        "max_size": config.batch_size * 2,
        "shuffle": True,
        "seed": config.seed,
        "policy": config.slicing,
    }
    if config.slicing == "throughput":
        options["global_batch"] = config.batch_size * replicas
    else:
        options["initial_size"] = config.batch_size
    return options


class PositionError(ValueError):
    """A recorded data position does not fit this run (another seed, slicing or batch size)."""


class Batches:
    """This replica's sample indices per step, and the step's global sample count.

    Fixed slicing: the epoch's permutation is cut into blocks of batch_size samples; a step
    takes the next `replicas` blocks, one per replica, and the epoch ends when fewer remain.
    Dynamic slicing: `DynamicSlicer`, whose position is global already.
    """

    def __init__(self, config: TrainConfig, place: RankPlace, num_samples: int) -> None:
        self.config = config
        self.place = place
        replicas = place.dims.dp
        self.dynamic: DynamicSlicer | None = None
        self.epoch = 0
        self.consumed = 0  # samples of this epoch handed out, summed over replicas
        if config.slicing == "fixed":
            self.num_blocks = num_samples // config.batch_size
            if self.num_blocks < replicas:
                raise ValueError(
                    f"the training text holds {num_samples} windows of --seq-len "
                    f"{config.seq_len}: too few for {replicas} replicas of --batch-size "
                    f"{config.batch_size}; raise --train-bytes"
                )
            self.fixed = FixedSlicer(num_samples, self.num_blocks, drop_last=True, shuffle=True,
                                     seed=config.seed)  # fmt: skip
        else:
            # Its statistics go through the run's --comm ("ring" asks what "auto" gives them).
            comm = "torch" if config.comm == "torch" else "auto"
            self.dynamic = DynamicSlicer(num_samples, group=place.dp_group,
                                         world_size=replicas, comm=comm,
                                         **dynamic_options(config, replicas))  # fmt: skip

    def next(self) -> tuple[list[int], int]:
        """(this replica's sample indices, the step's global sample count); advances."""
        replica = self.place.replica
        if self.dynamic is not None:
            blocks = self.dynamic.next_step()
            return blocks[replica], sum(len(b) for b in blocks)
        replicas, size = self.place.dims.dp, self.config.batch_size
        first = self.consumed // size
        if first + replicas > self.num_blocks:
            self.epoch, self.consumed, first = self.epoch + 1, 0, 0
        if self.epoch != self.fixed.epoch:  # set_epoch drops the cached permutation
            self.fixed.set_epoch(self.epoch)
        self.consumed += replicas * size
        return self.fixed.block(first + replica), replicas * size

    def state_dict(self) -> dict[str, Any]:
        """The data position as plain values (JSON-serialisable)."""
        if self.dynamic is not None:
            return {"slicing": self.config.slicing, "slicer": self.dynamic.state_dict()}
        return {"slicing": "fixed", "seed": self.config.seed, "epoch": self.epoch,
                "samples_consumed": self.consumed}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position recorded by any layout.

        Raises:
            PositionError: the position was recorded with another --slicing, --seed or (for
                fixed slicing, mid-block) --batch-size.
        """
        if state["slicing"] != self.config.slicing:
            raise PositionError(
                f"it was written with --slicing {state['slicing']}; resume with the same "
                f"(this run has --slicing {self.config.slicing})"
            )
        if self.dynamic is not None:
            self.dynamic.load_state_dict(state["slicer"], reshard=True)
            return
        if state["seed"] != self.config.seed:
            raise PositionError(
                f"it was written with --seed {state['seed']}; resume with the same (this run "
                f"has --seed {self.config.seed})"
            )
        consumed = int(state["samples_consumed"])
        if consumed % self.config.batch_size:
            raise PositionError(
                f"its data position ({consumed} samples) is not a whole number of blocks of "
                f"--batch-size {self.config.batch_size}: resume with the --batch-size it used"
            )
        self.epoch, self.consumed = int(state["epoch"]), consumed
