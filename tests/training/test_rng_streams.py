"""A checkpoint records the RNG state of every CUDA device a rank sees, and a resume sets each on
its own device: on a machine without a GPU, with torch.cuda's generator functions replaced by a
fake that keeps one state per device."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from fastpar.training.batches import Batches
from fastpar.training.checkpoint import Found, find_intact
from fastpar.training.config import TrainConfig
from fastpar.training.loop import build_stage
from fastpar.training.parallel_dims import RankPlace
from fastpar.training.state import restore, save_checkpoint

DEVICES = 3
CURRENT = 1  # not device 0: a state put on the wrong device shows


class FakeCudaGenerators:
    """torch.cuda's generator functions on `DEVICES` devices, each with a state of its own."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.states = {device: self.drawn() for device in range(DEVICES)}
        # torch.cuda.is_available stays False: torch.distributed.checkpoint would use streams.
        for name, fake in [("is_initialized", lambda: True), ("device_count", lambda: DEVICES),
                           ("current_device", lambda: CURRENT),
                           ("get_rng_state", self.get_rng_state),
                           ("set_rng_state", self.set_rng_state)]:  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, fake)

    @staticmethod
    def drawn() -> torch.Tensor:
        return torch.randint(256, (16,), dtype=torch.uint8)  # seed and offset, as CUDA's

    @staticmethod
    def index(device: int | str | torch.device) -> int:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return CURRENT if device.index is None else device.index  # "cuda": the current one

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set_rng_state(
        self, new_state: torch.Tensor, device: int | str | torch.device = "cuda"
    ) -> None:
        self.states[self.index(device)] = new_state.clone()

    def snapshot(self) -> dict[int, torch.Tensor]:
        return {device: state.clone() for device, state in self.states.items()}

    def scramble(self) -> None:
        self.states = {device: self.drawn() for device in self.states}


def _assert_states_equal(found: dict[int, torch.Tensor], expected: dict[int, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for device, state in expected.items():
        assert torch.equal(found[device], state), f"device {device}"


def _checkpoint(root: Path) -> tuple[TrainConfig, RankPlace, Found]:
    """A one-rank run's options, its place and its checkpoint of step 1."""
    config = TrainConfig(embed=4, hidden=8, layers=1, seq_len=8, batch_size=2, train_bytes=4_000,
                         validation_bytes=1_000, steps=2, checkpoint_dir=root)  # fmt: skip
    place = RankPlace(dims=config.layout(1), rank=0, replica=0, stage=0, dp_group=None,
                      pp_group=None)  # fmt: skip
    stage = build_stage(config, place, torch.device("cpu"))
    save_checkpoint(config, 1, place, stage.module, stage.optimizer, Batches(config, place, 64))
    found, _ = find_intact(root)
    assert found is not None
    return config, place, found


def _restore(config: TrainConfig, place: RankPlace, found: Found) -> None:
    stage = build_stage(config, place, torch.device("cpu"))
    restore(config, found, place, stage.module, stage.optimizer, Batches(config, place, 64))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_every_cuda_device_resumes_its_own_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rank driving several GPUs (a pipeline stage per GPU, a model split across two) resumed
    only its current device's stream; the others drew other numbers than an unbroken run."""
    cuda = FakeCudaGenerators(monkeypatch)
    config, place, found = _checkpoint(tmp_path)
    saved = cuda.snapshot()  # as the save found them
    saved_torch, saved_python = torch.get_rng_state(), random.getstate()
    cuda.scramble()
    torch.seed()
    random.seed()
    _restore(config, place, found)
    _assert_states_equal(cuda.states, saved)
    assert torch.equal(torch.get_rng_state(), saved_torch)
    assert random.getstate() == saved_python

    # On fewer visible devices, each takes its own index's state; more keep theirs.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda.scramble()
    untouched = cuda.states[2].clone()
    _restore(config, place, found)
    _assert_states_equal(cuda.states, {0: saved[0], 1: saved[1], 2: untouched})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_checkpoint_of_the_current_device_alone_still_sets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Manifests written before every device's state was recorded hold the current device's as
    "cuda"; a resume sets it there, and no other device's."""
    cuda = FakeCudaGenerators(monkeypatch)
    config, place, found = _checkpoint(tmp_path)
    saved_current = cuda.states[CURRENT].clone()
    (rank0,) = found.manifest["rng"]["ranks"]
    streams = {key: value for key, value in rank0.items() if key != "cuda_devices"}
    streams["cuda"] = rank0["cuda_devices"][CURRENT]
    older = dataclasses.replace(
        found, manifest={**found.manifest, "rng": {"ranks": [json.loads(json.dumps(streams))]}}
    )
    cuda.scramble()
    others = {device: state for device, state in cuda.snapshot().items() if device != CURRENT}
    _restore(config, place, older)
    _assert_states_equal(cuda.states, {**others, CURRENT: saved_current})


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, as meant
def test_a_resume_without_cuda_sets_the_other_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written with GPUs resumes on a machine without one."""
    cuda = FakeCudaGenerators(monkeypatch)
    config, place, found = _checkpoint(tmp_path)
    saved_torch = torch.get_rng_state()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    before = cuda.snapshot()
    torch.seed()
    _restore(config, place, found)
    assert torch.equal(torch.get_rng_state(), saved_torch)
    _assert_states_equal(cuda.states, before)
