"""bench/pipeline.py leaves out torch's baseline where that torch cannot run it over gloo, and
only there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastpar.parallel.pipeline.schedules import Placement

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pipeline as bench_pipeline


@pytest.mark.parametrize("new_warmup", [True, False], ids=["torch-2.13-warmup", "older-torch"])
def test_only_a_schedule_with_neighbours_on_one_rank_is_left_out_of_an_older_torch(
    monkeypatch: pytest.MonkeyPatch, new_warmup: bool
) -> None:
    schedule_base = bench_pipeline.pipelining.schedules._PipelineSchedule
    if new_warmup:
        monkeypatch.setattr(schedule_base, "_warmup_p2p", lambda *args: None, raising=False)
    else:
        monkeypatch.delattr(schedule_base, "_warmup_p2p", raising=False)
    left_out = {
        name
        for name, (_, num_stages) in bench_pipeline.MATCHES.items()
        if bench_pipeline.torch_cannot_run(Placement.of(name, 2, num_stages)) is not None
    }
    # zbv on 2 ranks: rank 1 holds stages 1 and 2; no other schedule puts neighbours together.
    assert left_out == (set() if new_warmup else {"zbv"})
