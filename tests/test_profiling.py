"""Profiler ranges: names as the traces show them, and the range torch.profiler records."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from fastpar.profiling import range_name, ranges_recorded, record_range


def test_range_name_joins_parts_without_spaces() -> None:
    assert range_name("pp", "send", "activation 3") == "fastpar.pp.send.activation3"
    assert range_name("pp", "recv", "gradient 0 stage 2") == "fastpar.pp.recv.gradient0stage2"
    assert range_name("pp", "forward", "s1.mb4") == "fastpar.pp.forward.s1.mb4"
    assert range_name("train", "step") == "fastpar.train.step"
    # Built once: the same object comes back.
    assert range_name("pp", "send", "activation 3") is range_name("pp", "send", "activation 3")


def test_record_range_shows_its_name_to_the_profiler() -> None:
    name = range_name("pp", "recv", "activation 7")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_range(name):
            pass
        with record_range("outside.fastpar"):
            pass
    names = [event.name for event in prof.events()]
    assert names.count("fastpar.pp.recv.activation7") == 1
    assert names.count("outside.fastpar") == 1


def test_ranges_are_recorded_only_while_someone_listens() -> None:
    nvtx = torch.cuda.is_initialized()  # NVTX ranges for Nsight: always recorded then
    assert ranges_recorded() == nvtx
    with profile(activities=[ProfilerActivity.CPU]):
        assert ranges_recorded()
    assert ranges_recorded() == nvtx
