"""The construction handshake: every rank's arguments, gathered on every rank and judged the same
way, so a mismatch (a stage count that is not the group's, differing micro-batch counts, stages
placed where the schedule does not put them, stages of `split_sequential` that do not hold every
layer once: cut differently on different ranks) raises the same error on every rank instead of a
hang at the first step, or a model trained with a layer skipped or run twice.

A rank's arguments travel as a fixed-length int64 row (`Handshake.encode`): a bad value (the
wrong type, an unknown schedule) is encoded as -1 and the rank's own error is raised there;
the others say which rank was invalid.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastpar.comm.hosts import host_identity
from fastpar.parallel.pipeline.config import TRANSPORTS
from fastpar.parallel.pipeline.schedules import SCHEDULES, Placement
from fastpar.parallel.pipeline.stages import StageLayers
from fastpar.parallel.pipeline.wire import PipelineError

__all__ = ["MAX_CHUNKS", "Handshake", "check_handshakes", "exchange_handshakes"]

MAX_CHUNKS = 8  # model chunks one rank may hold
_UNKNOWN = -1


def _code(value: object, names: tuple[str, ...]) -> int:
    """A name's code on the wire: its position in `names`, or -1 when it is not one."""
    return names.index(value) if isinstance(value, str) and value in names else _UNKNOWN


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else _UNKNOWN


@dataclass(frozen=True)
class Handshake:
    """One rank's pipeline arguments.

    Attributes:
        ok: the rank validated its own arguments.
        stages: the global stages it holds (-1 for a value that is not an int).
        num_stages, num_microbatches: as given (-1: not an int).
        schedule, transport: as given (None: not one of SCHEDULES / TRANSPORTS).
        host: a 64-bit hash of `host_identity()` (equal: shared memory reaches the peer).
        layers: per entry of `stages`, the layers of the split model it holds (see
            `stage_layers`), or None for a stage not made by `split_sequential`.
    """

    ok: bool
    stages: tuple[int, ...]
    num_stages: int
    num_microbatches: int
    schedule: str | None
    transport: str | None
    host: int
    layers: tuple[StageLayers | None, ...] = ()

    @classmethod
    def local(
        cls,
        *,
        ok: bool,
        stages: object,
        num_stages: object,
        num_microbatches: object,
        schedule: object,
        transport: object,
        layers: tuple[StageLayers | None, ...] = (),
    ) -> Handshake:
        """This rank's row, from its raw (possibly invalid) arguments; `layers` as in the
        attribute (empty when the arguments are invalid)."""
        listed = list(stages) if isinstance(stages, list | tuple) else [stages]
        digest = hashlib.blake2b(host_identity().encode(), digest_size=8).digest()
        return cls(
            ok=ok,
            stages=tuple(_int(s) for s in listed[:MAX_CHUNKS]),
            num_stages=_int(num_stages),
            num_microbatches=_int(num_microbatches),
            schedule=schedule if _code(schedule, SCHEDULES) != _UNKNOWN else None,  # type: ignore[arg-type]
            transport=transport if _code(transport, TRANSPORTS) != _UNKNOWN else None,  # type: ignore[arg-type]
            host=int.from_bytes(digest, "little", signed=True),
            layers=layers[:MAX_CHUNKS],
        )

    def encode(self) -> list[int]:
        stages = list(self.stages) + [_UNKNOWN] * (MAX_CHUNKS - len(self.stages))
        # (start, end, total) per chunk; total 0 (a model has layers): no StageLayers.
        layers = [(x.start, x.end, x.total) if x is not None else (0, 0, 0) for x in self.layers]
        layers += [(0, 0, 0)] * (MAX_CHUNKS - len(layers))
        return [
            int(self.ok),
            self.num_stages,
            self.num_microbatches,
            _code(self.schedule, SCHEDULES),
            _code(self.transport, TRANSPORTS),
            self.host,
            len(self.stages),
            *stages,
            len(self.layers),
            *(value for triple in layers for value in triple),
        ]

    @classmethod
    def decode(cls, row: list[int]) -> Handshake:
        ok, num_stages, num_microbatches, schedule, transport, host, count, *rest = row
        stages, (num_layers, *flat) = rest[:MAX_CHUNKS], rest[MAX_CHUNKS:]
        triples = [flat[i : i + 3] for i in range(0, 3 * num_layers, 3)]
        return cls(
            ok=bool(ok),
            stages=tuple(stages[:count]),
            num_stages=num_stages,
            num_microbatches=num_microbatches,
            schedule=SCHEDULES[schedule] if schedule != _UNKNOWN else None,
            transport=TRANSPORTS[transport] if transport != _UNKNOWN else None,
            host=host,
            layers=tuple(StageLayers(*t) if t[2] > 0 else None for t in triples),
        )


def exchange_handshakes(
    group: dist.ProcessGroup, mine: Handshake, timeout_s: float
) -> list[Handshake]:
    """Every rank's row, by group rank. Gathered on the group itself: on gloo with a wait
    bounded by timeout_s, on NCCL with all_gather_object (bounded by the group's timeout)."""
    size = dist.get_world_size(group)
    if dist.get_backend(group) != "gloo":
        table: list[object] = [None] * size
        dist.all_gather_object(table, mine.encode(), group=group)
        return [Handshake.decode(list(row)) for row in table]  # type: ignore[call-overload]
    local = torch.tensor(mine.encode(), dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(size)]
    work = dist.all_gather(gathered, local, group=group, async_op=True)
    assert work is not None
    try:
        work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise PipelineError(
            f"Pipeline construction: not every rank of the group (size {size}) joined within "
            f"timeout_s={timeout_s:g} ({error})",
            stage=-1,
            rank=-1,
        ) from error
    return [Handshake.decode(row.tolist()) for row in gathered]


def check_handshakes(table: list[Handshake], group_rank: int) -> Placement:
    """Judge every rank's arguments the same way, so all ranks raise the same error.

    Returns:
        The placement of the stages on the group's ranks.
    """
    size = len(table)
    bad = [rank for rank, row in enumerate(table) if not row.ok]
    if bad:
        raise ValueError(f"Pipeline arguments are invalid on group rank(s) {bad} (see their error)")
    for name in ("num_microbatches", "schedule", "transport"):
        values = [getattr(row, name) for row in table]
        if len(set(values)) != 1:
            raise ValueError(f"{name} differs across the group: {values}")
    schedule = table[0].schedule
    assert schedule is not None
    num_stages = [row.num_stages for row in table]
    one_each = all(len(row.stages) == 1 for row in table)
    several = schedule in ("interleaved-1f1b", "zbv")  # stages per rank
    if one_each and not several and any(n != size for n in num_stages):
        mine = num_stages[group_rank]
        if mine != size:
            raise ValueError(f"num_stages {mine} != group size {size}")
        raise ValueError(f"num_stages differs across the group: {num_stages} (group size {size})")
    if len(set(num_stages)) != 1:
        raise ValueError(f"num_stages differs across the group: {num_stages} (group size {size})")
    if table[0].transport == "shm" and len({row.host for row in table}) != 1:
        raise ValueError(
            "transport 'shm' needs every stage on one host (and IPC namespace); use 'auto' to "
            "let stages on other hosts use torch.distributed"
        )
    placement = Placement.of(schedule, size, num_stages[0])  # type: ignore[arg-type]
    held = [sorted(row.stages) for row in table]  # a rank may list its chunks in any order
    wanted = [list(placement.stages_of(rank)) for rank in range(size)]
    if held != wanted:
        if one_each and all(len(w) == 1 for w in wanted):
            raise ValueError(
                "stage_index must equal the rank in the pipeline's group: group ranks "
                f"0..{size - 1} hold stages {[h[0] for h in held]} (this rank: stage_index "
                f"{held[group_rank][0]}, group rank {group_rank})"
            )
        raise ValueError(
            f"schedule {schedule!r} places stages {wanted} on group ranks 0..{size - 1}, got "
            f"stage_index {held} (this rank: group rank {group_rank})"
        )
    _check_layers(table, num_stages[0])
    return placement


def _check_layers(table: list[Handshake], num_stages: int) -> None:
    """Raise unless the stages that know their layers (`StageLayers`) hold every layer of one
    model once, in order: each ends where the next begins, the first begins at 0 and the last
    ends at the end. Stages cut differently on different ranks still pass each other tensors
    of the right shape when layers are alike, and would train a model with layers skipped or
    run twice."""
    held: dict[int, tuple[int, StageLayers]] = {}
    for rank, row in enumerate(table):
        for stage, layers in zip(row.stages, row.layers, strict=False):
            if layers is not None:
                held[stage] = (rank, layers)
    if not held:
        return

    def name(stage: int) -> str:
        rank, layers = held[stage]
        return f"stage {stage} (group rank {rank}) holds layers [{layers.start}, {layers.end})"

    totals = {layers.total for _, layers in held.values()}
    problems = []
    if len(totals) > 1:
        problems.append(f"the stages come from models of {sorted(totals)} layers")
    for stage in sorted(held):
        layers = held[stage][1]
        if stage == 0 and layers.start != 0:
            problems.append(f"{name(stage)}: layers [0, {layers.start}) run nowhere")
        if stage == num_stages - 1 and layers.end != layers.total:
            problems.append(f"{name(stage)} of {layers.total}: layers [{layers.end}, "
                            f"{layers.total}) run nowhere")  # fmt: skip
        if stage + 1 not in held:
            continue
        start = held[stage + 1][1].start
        if start < layers.end:
            problems.append(f"{name(stage)}, {name(stage + 1)}: layers [{start}, {layers.end}) "
                            "run twice")  # fmt: skip
        elif start > layers.end:
            problems.append(f"{name(stage)}, {name(stage + 1)}: layers [{layers.end}, {start}) "
                            "run nowhere")  # fmt: skip
    if problems:
        raise ValueError(
            "the stages of split_sequential do not fit together (cut differently on different "
            "ranks? pass the same split_points everywhere, or balance='auto' on every rank of "
            "the group): " + "; ".join(problems)
        )
