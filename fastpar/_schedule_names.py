"""The pipeline schedules' names and where each places its stages, as plain data.

`fastpar.parallel.pipeline.schedules` builds on them; `fastpar train` checks its options against
them before any rank starts, which it could not do through the pipeline package without
importing torch (every module under fastpar.parallel imports it, through the package).
"""

from __future__ import annotations

from typing import Literal, get_args

Schedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zbv"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PlacementKind = Literal["single", "loop", "v"]
PLACEMENTS: dict[str, PlacementKind] = {
    "gpipe": "single",
    "1f1b": "single",
    "interleaved-1f1b": "loop",
    "zero-bubble": "single",
    "zbv": "v",
}
# Schedules that give each rank several chunks (global stages) of the model.
CHUNKED_SCHEDULES: tuple[str, ...] = tuple(s for s, kind in PLACEMENTS.items() if kind != "single")
