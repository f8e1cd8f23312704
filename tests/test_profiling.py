"""Profiler ranges: names as the traces show them, and the range torch.profiler records."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fastpar import profiling
from fastpar.profiling import nvtx_tool_attached, range_name, ranges_recorded, record_range


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
    nvtx = torch.cuda.is_initialized() and nvtx_tool_attached()
    assert ranges_recorded() == nvtx
    with profile(activities=[ProfilerActivity.CPU]):
        assert ranges_recorded()
    assert ranges_recorded() == nvtx


@pytest.fixture
def fresh_nvtx_answer():
    """The tool question is answered once per process; these tests ask it again."""
    nvtx_tool_attached.cache_clear()
    yield
    nvtx_tool_attached.cache_clear()


@pytest.mark.usefixtures("fresh_nvtx_answer")
def test_nvtx_tool_is_attached_when_nvtx_would_load_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # What Nsight Systems and Nsight Compute set in the processes they launch.
    monkeypatch.setenv("NVTX_INJECTION64_PATH", "/opt/nvidia/nsight-systems/libToolsInjection64.so")
    assert nvtx_tool_attached()
    nvtx_tool_attached.cache_clear()
    monkeypatch.setenv("NVTX_INJECTION64_PATH", "")  # NVTX ignores an empty path
    assert not nvtx_tool_attached()
    nvtx_tool_attached.cache_clear()
    monkeypatch.delenv("NVTX_INJECTION64_PATH")
    assert not nvtx_tool_attached()  # and no tool library is loaded in the test process


@pytest.mark.usefixtures("fresh_nvtx_answer")
def test_cuda_alone_records_no_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU host without a tool, NVTX calls are no-ops: callers must keep their fast paths
    (the pipeline's fused plan); with a tool attached, they must open their ranges."""
    monkeypatch.setattr(profiling.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.delenv("NVTX_INJECTION64_PATH", raising=False)
    assert not ranges_recorded()
    nvtx_tool_attached.cache_clear()
    monkeypatch.setenv("NVTX_INJECTION64_PATH", "/opt/nvidia/nsight-systems/libToolsInjection64.so")
    assert ranges_recorded()
    monkeypatch.setattr(profiling.torch.cuda, "is_initialized", lambda: False)
    assert not ranges_recorded()  # a tool, but CUDA not initialised: ranges would initialise it
