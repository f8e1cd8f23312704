"""What a training checkpoint holds and how a run returns to it, on any layout.

Tensors go through torch.distributed.checkpoint: the model's and the optimizer's state from
`torch.distributed.checkpoint.state_dict`, under the full model's parameter names (a stage
module keeps the layer indices of the whole model) and with the optimizer state flattened per
parameter, so each rank of any layout writes and reads exactly the parameters it holds; the
replicas of a stage hold equal tensors and DCP stores one copy. The manifest records the rest:
the data position (see `Batches`), the RNG states, the options that must not change across a
resume, and the layout that wrote it.

RNG streams: each rank seeds torch's and Python's global generators from --seed and its rank
(`seed_rank_streams`), so two runs with the same options draw the same numbers, and a model with
stochastic layers (dropout) gets a stream of its own on every rank. The manifest records every
rank's streams; a resume on the layout that wrote them continues each rank's own, and on another
layout (where no rank's stream continues any other's) seeds them from --seed, the rank and the step.
"""

from __future__ import annotations

import base64
import hashlib
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from fastpar._logging import get_logger
from fastpar.training import checkpoint
from fastpar.training.batches import Batches, PositionError
from fastpar.training.config import TrainConfig
from fastpar.training.parallel_dims import ParallelDims, RankPlace

logger = get_logger(__name__)

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Options a resumed run must share with the run that wrote the checkpoint: they fix the model's
# shapes and the meaning of the data position.
MUST_MATCH = ("embed", "hidden", "layers", "cell", "seq_len", "train_bytes", "slicing", "seed")
# What an option missing from an older manifest was: checkpoints from before --cell hold LSTMs.
_BEFORE_RECORDED = {"cell": "lstm"}


def seed_rank_streams(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's torch (CPU and every CUDA device) and Python global generators from
    `seed`, `rank` and `step` (a hash: nearby seeds or ranks give unrelated streams)."""
    digest = hashlib.sha256(f"fastpar rng {seed} {rank} {step}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63 - 1
    torch.manual_seed(derived)
    random.seed(derived)


def _encoded(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decoded(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _rng_streams() -> dict[str, Any]:
    """This rank's global generators' states, JSON-serialisable: torch's CPU one, Python's and,
    where CUDA is in use, every CUDA device's by index (a rank may drive several: a pipeline
    stage per GPU, a model split across two)."""
    streams = {"torch": _encoded(torch.get_rng_state()), "python": random.getstate()}
    if torch.cuda.is_initialized():
        streams["cuda_devices"] = [
            _encoded(torch.cuda.get_rng_state(device))
            for device in range(torch.cuda.device_count())
        ]
    return streams


def _set_rng_streams(streams: dict[str, Any]) -> None:
    """Set the generators `_rng_streams` recorded. Each CUDA state goes to the device of its
    index where this process sees one; a record of before every device's state ("cuda") held
    the current device's."""
    torch.set_rng_state(_decoded(streams["torch"]))
    visible = range(torch.cuda.device_count())  # none without CUDA
    if visible:
        if "cuda_devices" in streams:
            for device, state in zip(visible, streams["cuda_devices"], strict=False):
                torch.cuda.set_rng_state(_decoded(state), device)
        elif "cuda" in streams:  # the current device's, as it was set
            torch.cuda.set_rng_state(_decoded(streams["cuda"]))
    version, internal, gauss = streams["python"]
    random.setstate((version, tuple(internal), gauss))


def _every_rank_streams() -> list[dict[str, Any]] | None:
    """On rank 0, which writes the manifest, every rank's `_rng_streams` by rank; None on the
    others (collective)."""
    mine = _rng_streams()
    if not dist.is_initialized():
        return [mine]
    rank0 = dist.get_rank() == 0
    streams: list[Any] | None = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(mine, streams, dst=0)
    return streams


def _layout_record(dims: ParallelDims) -> dict[str, int]:
    return {"world_size": dims.world_size, "dp": dims.dp, "pp": dims.pp}


def _tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_OPTIONS)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(
    config: TrainConfig,
    step: int,
    place: RankPlace,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
) -> Path:
    """Write the checkpoint of `step` (collective); returns its folder."""
    metadata = {
        "written_by": _layout_record(place.dims),
        "options": {name: getattr(config, name) for name in MUST_MATCH},
        "data": batches.state_dict(),
        "rng": {"ranks": _every_rank_streams()},
    }
    return checkpoint.save(config.checkpoint_dir, step, _tensors(module, optimizer), metadata)


def check_options(config: TrainConfig, found: checkpoint.Found) -> None:
    """Refuse to resume `found` with options that change the model's shapes or the meaning of
    its data position (`MUST_MATCH`).

    Raises:
        checkpoint.CheckpointError: naming the option, its recorded value and this run's.
    """
    recorded_options = found.manifest["options"]
    for name in MUST_MATCH:
        recorded = recorded_options.get(name, _BEFORE_RECORDED.get(name))
        mine = getattr(config, name)
        if recorded != mine:
            flag = "--" + name.replace("_", "-")
            raise checkpoint.CheckpointError(
                f"checkpoint {found.directory} was written with {flag} {recorded}; this run has "
                f"{flag} {mine}: resume with the same value"
            )


def restore(
    config: TrainConfig,
    found: checkpoint.Found,
    place: RankPlace,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
) -> int:
    """Load `found` into this rank's module, optimizer, data position and RNG streams
    (collective).

    Returns:
        The step to continue from.

    Raises:
        checkpoint.CheckpointError: the checkpoint was written with other options.
    """
    manifest = found.manifest
    check_options(config, found)
    try:
        batches.load_state_dict(manifest["data"])
    except PositionError as error:
        raise checkpoint.CheckpointError(f"checkpoint {found.directory}: {error}") from None
    state = _tensors(module, optimizer)
    checkpoint.load(found.directory, state)
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=_OPTIONS)  # fmt: skip
    # The loaded param groups carry the --lr of the run that wrote them; this run's applies,
    # and a change is said (a resume without --lr takes the default, not the earlier run's).
    loaded = sorted({group["lr"] for group in optimizer.param_groups})
    if loaded != [config.lr] and (not dist.is_initialized() or dist.get_rank() == 0):
        logger.warning("training from step %d at --lr %g; the checkpoint's run trained at %s",
                       found.step, config.lr, ", ".join(f"{lr:g}" for lr in loaded))  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = config.lr
    _restore_rng_streams(config, found, place)
    return found.step


def _restore_rng_streams(config: TrainConfig, found: checkpoint.Found, place: RankPlace) -> None:
    rng = found.manifest["rng"]
    if "ranks" not in rng:  # manifests before per-rank streams recorded rank 0's, for all
        _set_rng_streams(rng)
        return
    if found.manifest["written_by"] == _layout_record(place.dims):
        _set_rng_streams(rng["ranks"][place.rank])
    else:
        seed_rank_streams(config.seed, place.rank, found.step)
