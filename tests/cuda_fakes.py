"""Stand-ins for CUDA objects that let CPU tests drive the CUDA ring's host-side logic."""

from __future__ import annotations


class DoneEvent:
    """A CUDA event recorded behind a call that has finished."""

    def record(self, stream: object) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass
