"""What ``backend="auto"`` runs: fastpar's Triton recurrence or torch's own kernels (cuDNN).

The rule: fastpar's Triton kernels only where a GPU measurement shows them faster than torch's
module, forward and forward+backward, for the cell, dtype and Triton kernel variant that would
run; torch's native kernels (``fastpar.ops.lstm_aten`` / ``rnn_aten``: cuDNN on CUDA, oneDNN or
ATen on CPU) everywhere else, unmeasured cases included, so "auto" never knowingly runs slower
than torch. ``MEASURED`` holds the measurements; ``choose_auto_backend`` applies them.

Glossary: B batch, H hidden units, P size of h (proj_size or H).
"""

from __future__ import annotations

import operator
from typing import Literal, NamedTuple, cast

import torch

from fastpar._checks import check_choice
from fastpar.ops import interpreter_active

# The cells as fastpar.ops.lstm_config names them (its CellKind; that module imports Triton).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


class Measurement(NamedTuple):
    """One case of bench/lstm.py: torch's module against fastpar's Triton kernels, in ms."""

    cell: str  # "lstm", "gru" or "rnn" (tanh; relu runs the same kernel)
    dtype: torch.dtype
    shape: str  # B T I H and options
    kernel: Literal["persistent", "step"]  # the Triton kernel fastpar ran, forward and backward
    torch_ms: tuple[float, float]  # torch.nn module (cuDNN): forward, forward+backward
    triton_ms: tuple[float, float]  # fastpar's Triton kernels: forward, forward+backward

    @property
    def triton_wins(self) -> bool:
        return all(t < c for t, c in zip(self.triton_ms, self.torch_ms, strict=True))


_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32
# Measured on one H200 (132 SMs), torch 2.11+cu130, cuDNN 9.19, Triton 3.6, bench/lstm.py,
# the kernels of today (then called v2). Not measured yet (so torch's kernels): float16 and
# float32 GRU and RNN.
MEASURED: tuple[Measurement, ...] = (
    Measurement("lstm", _BF16, "B16 T1024 I768 H768", "persistent", (18.6, 36.8), (3.85, 12.0)),
    Measurement("lstm", _FP16, "B16 T1024 I768 H768", "persistent", (2.10, 6.69), (3.85, 12.0)),
    Measurement("lstm", _FP32, "B16 T1024 I768 H768", "persistent", (20.0, 51.9), (31.8, 55.3)),
    Measurement("lstm", _BF16, "B16 T512 I768 H768 P384", "step", (13.6, 39.5), (31.0, 121.0)),
    Measurement("lstm", _BF16, "B64 T256 I1024 H1024", "persistent", (7.01, 16.1), (1.47, 7.25)),
    Measurement("lstm", _BF16, "B256 T100 I512 H512", "persistent", (2.13, 7.32), (0.89, 2.82)),
    Measurement(
        "lstm", _BF16, "B64 T512 I512 H512 packed", "persistent", (12.9, 30.1), (5.36, 25.8)
    ),
    Measurement("gru", _BF16, "B16 T1024 I768 H768", "persistent", (23.9, 54.3), (3.83, 11.3)),
    Measurement("rnn", _BF16, "B16 T1024 I768 H768", "persistent", (16.1, 52.9), (2.66, 7.83)),
    Measurement("lstm", _BF16, "B16 T1024 I768 H768", "step", (18.6, 36.8), (24.0, 51.7)),
)


# (cell, dtype, kernel) of MEASURED where Triton beat torch in every case: asked every forward.
_TRITON_WINS = frozenset(
    key
    for key in {(m.cell, m.dtype, m.kernel) for m in MEASURED}
    if all(m.triton_wins for m in MEASURED if (m.cell, m.dtype, m.kernel) == key)
)


def triton_measured_faster(cell: str, dtype: torch.dtype, kernel: str) -> bool:
    """Whether ``MEASURED`` has cases of this cell ("lstm", "gru", "rnn_tanh", "rnn_relu"),
    dtype and Triton kernel, and Triton beat torch in every one, forward and forward+backward."""
    return ("rnn" if cell.startswith("rnn") else cell, dtype, kernel) in _TRITON_WINS


class AutoChoice(NamedTuple):
    backend: Literal["triton", "torch"]
    reason: str  # for the log: why


def choose_auto_backend(
    cell: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    hidden: int,
    proj: int = 0,
    kernel: Literal["auto", "step", "persistent"] = "auto",
    backward: bool = True,
    one_step: bool = False,
    num_sms: int | None = None,
) -> AutoChoice:
    """The backend "auto" runs for one recurrent stack, and why.

    Arguments:
        cell: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        device, dtype: of the input.
        batch: B; hidden: H; proj: P, the LSTM's proj_size (0: none).
        kernel: the Triton variant the module names ("step" runs the step kernel, the others
            the persistent kernel where it applies).
        backward: whether a backward will run (grad mode): then the persistent kernel must
            apply to it too, as in every measured win.
        one_step: a cell module (one step), which no measurement covers.
        num_sms: the device's SMs (default: asked of the device); tests pass a number.

    Returns:
        AutoChoice("triton" or "torch", reason).
    """
    check_choice("cell", cell, CELLS)
    if device.type != "cuda":
        return AutoChoice("torch", f"{dtype} input on {device.type}; the Triton kernels need CUDA")
    if interpreter_active():
        return AutoChoice("torch", "TRITON_INTERPRET=1 would run the Triton kernels on the host")
    if one_step:
        return AutoChoice("torch", "one step of a cell: torch's fused cell kernel")
    # Plain ints: under torch.compile with a dynamic batch, operator.index specialises the graph
    # on it (the kernels' tiles depend on it anyway); a symbolic batch traced through the tile
    # choice's loops grows sympy expressions for minutes. (int() would keep it symbolic.)
    batch, hidden, proj = operator.index(batch), operator.index(hidden), operator.index(proj)
    variant = "step"
    if kernel != "step":
        from fastpar.ops import lstm_config

        sms = lstm_config.num_sms(device) if num_sms is None else num_sms
        passes = (False, True) if backward else (False,)
        kind = cast("lstm_config.CellKind", cell)
        configs = [
            lstm_config.persistent_config(
                batch, hidden, proj or hidden, dtype, sms, False, bwd, kind
            )
            for bwd in passes
        ]
        if all(c is not None for c in configs):
            variant = "persistent"
    where = f"{dtype} {cell} B{batch} H{hidden}" + (f" P{proj}" if proj else "")
    if triton_measured_faster(cell, dtype, variant):
        return AutoChoice(
            "triton", f"{where}: the Triton {variant} kernel, measured faster than cuDNN"
        )
    return AutoChoice(
        "torch", f"{where}: cuDNN; the Triton {variant} kernel was not measured faster there"
    )


__all__ = [
    "MEASURED",
    "AutoChoice",
    "Measurement",
    "choose_auto_backend",
    "triton_measured_faster",
]
