"""A rank SIGKILLed inside an all_reduce, on either transport: the survivors must raise naming it
within 2 s although the ring's timeout is long (only the dead process's pid can end their wait
early). Used by the CPU and the CUDA ring tests."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from fastpar.comm import CommTimeoutError, RingAllReduce

KILLED = 2  # the rank that dies; run with 3 ranks and may_die=(KILLED,)


def killed_mid_call(
    rank: int, world_size: int, device: str = "cpu", shared: bool = False
) -> tuple[float, str] | None:
    """Rank KILLED enqueues a call and kills itself; the others call and return (seconds from
    the kill to their error, the error's text). With `shared`, the tensor is in the ring's
    shared area (reduced without copies)."""
    where = torch.device(device)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    store = dist.distributed_c10d._get_default_store()
    # serve_shared_gpu: the CUDA test runs every rank on one GPU.
    with RingAllReduce(device=where, timeout=120, serve_shared_gpu=True) as ring:
        # Several chunks on either transport.
        tensor = ring.empty_shared(1 << 22) if shared else torch.empty(1 << 22, device=where)
        tensor.fill_(1)
        ring.all_reduce(tensor)
        if rank == KILLED:
            work = ring.all_reduce(tensor, async_op=True)
            store.set("killed/at", repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
            work.wait()  # not reached
        with pytest.raises(CommTimeoutError) as error:
            ring.all_reduce(tensor)
        return time.time() - float(store.get("killed/at").decode()), str(error.value)


def check_killed_rank_named(results: list[tuple[float, str] | None]) -> None:
    """Every survivor named the killed rank within 2 s; at least one saw its process gone."""
    assert results[KILLED] is None
    survivors = [r for r in results if r is not None]
    for after_kill, message in survivors:
        assert f"rank {KILLED}" in message, message
        assert after_kill < 2.0, (after_kill, message)  # the bound, not a benchmark
    assert any("exited" in message for _, message in survivors), survivors
