"""What a training checkpoint holds and how a run returns to it, on any layout.

Tensors go through torch.distributed.checkpoint: the model's and the optimizer's state from
`torch.distributed.checkpoint.state_dict`, under the full model's parameter names (a stage
module keeps the layer indices of the whole model) and with the optimizer state flattened per
parameter, so each rank of any layout writes and reads exactly the parameters it holds; the
replicas of a stage hold equal tensors and DCP stores one copy. The manifest records the rest:
the data position (see `Batches`), the RNG states, the options that must not change across a
resume, and the layout that wrote it.
"""

from __future__ import annotations

import base64
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
from fastpar.training.parallel_dims import RankPlace

logger = get_logger(__name__)

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Options a resumed run must share with the run that wrote the checkpoint: they fix the model's
# shapes and the meaning of the data position.
MUST_MATCH = ("embed", "hidden", "layers", "cell", "seq_len", "train_bytes", "slicing", "seed")
# What an option missing from an older manifest was: checkpoints from before --cell hold LSTMs.
_BEFORE_RECORDED = {"cell": "lstm"}


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
    dims = place.dims
    metadata = {
        "written_by": {"world_size": dims.world_size, "dp": dims.dp, "pp": dims.pp},
        "options": {name: getattr(config, name) for name in MUST_MATCH},
        "data": batches.state_dict(),
        "rng": {
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "python": random.getstate(),
        },
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
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
) -> int:
    """Load `found` into this rank's module, optimizer and data position (collective).

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
    rng = manifest["rng"]
    torch_state = bytearray(base64.b64decode(rng["torch"]))
    torch.set_rng_state(torch.frombuffer(torch_state, dtype=torch.uint8).clone())
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    return found.step
