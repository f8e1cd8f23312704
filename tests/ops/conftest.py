"""Fixtures shared by the recurrent-kernel tests (CPU interpreter and GPU)."""

from __future__ import annotations

import dataclasses

import pytest

from fastpar.ops import lstm_config, lstm_forward


@pytest.fixture(params=["resident", "k-loop"])
def forward_body(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each forward body: W_hh's share held whole, or read in K tiles
    (`_force_k_loop`); parametrize it indirectly to choose."""
    if request.param == "k-loop":
        _force_k_loop(monkeypatch)
    return request.param


def _force_k_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the forward kernels read W_hh's share a K tile at a time, as a GPU does where the
    share fits no tile's registers (or a step kernel's grid is more than one wave); the
    interpreter's configurations hold it whole wherever it fits."""

    def step(*args: object, **kwargs: object):
        cfg = lstm_config.step_config(*args, **kwargs)  # type: ignore[arg-type]
        return dataclasses.replace(cfg, w_resident=False, num_warps=4)

    def persistent(*args: object, **kwargs: object):
        cfg = lstm_config.persistent_config(*args, **kwargs)  # type: ignore[arg-type]
        if cfg is None:
            return None
        return dataclasses.replace(cfg, w_resident=False, block_k=32, num_warps=4)

    monkeypatch.setattr(lstm_forward, "step_config", step)
    monkeypatch.setattr(lstm_forward, "persistent_config", persistent)
