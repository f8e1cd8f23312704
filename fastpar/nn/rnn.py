"""``fastpar.nn.GRU``, ``fastpar.nn.RNN`` and their cells: drop-in replacements for torch's.

They hold the same parameters as ``torch.nn.GRU``/``RNN``/``GRUCell``/``RNNCell`` (names, shapes,
order and initialisation), so state dicts load in both directions, and pick a backend per call
exactly as fastpar.nn.LSTM does (fastpar.nn.recurrent): "triton" (fastpar.ops.rnn_op), "torch"
(torch's native kernels, fastpar.ops.rnn_aten), "reference" (fastpar.ops.rnn_reference) or
"auto" (triton where a GPU measurement shows it faster than torch, torch's kernels otherwise:
see fastpar.ops.auto_backend).

Both have one state, h; a ``CellOps`` names where each cell's functions live, and the modules
here are the same code for both.

Dimension letters: T time, B batch, I input_size, H hidden_size, L num_layers, D directions;
G = 3 gates (r, z, n) for the GRU, 1 for the RNN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import torch
from torch import Tensor

from fastpar._checks import check_choice
from fastpar.nn.recurrent import (
    Backend,
    Kernel,
    RecurrentBase,
    RecurrentCellBase,
    choose_recurrence,
    lengths_on_device,
)
from fastpar.ops.reference import LayerWeights
from fastpar.ops.rnn_aten import gru_cell_aten, gru_stack_aten, rnn_cell_aten, rnn_stack_aten
from fastpar.ops.rnn_reference import (
    Nonlinearity,
    gru_recurrence_reference,
    gru_stack,
    rnn_recurrence_reference,
    rnn_stack,
)

NONLINEARITIES: tuple[str, ...] = get_args(Nonlinearity)


@dataclass(frozen=True)
class CellOps:
    """A one-state cell's functions: the stack and its recurrence per backend, and torch's
    kernels."""

    cell: str  # "GRU" or "RNN", for messages
    stack: Callable[..., tuple[Tensor, Tensor]]  # rnn_reference.gru_stack or rnn_stack
    reference: Callable[..., Tensor]  # the pure-PyTorch recurrence
    triton: str  # the Triton recurrence's name in fastpar.ops.rnn_op (imported when it runs)
    stack_aten: Callable[..., tuple[Tensor, Tensor]]  # the stack on torch's kernels
    cell_aten: Callable[..., Tensor]  # one step on torch's kernels

    def _triton(self) -> Callable[..., Tensor]:
        from fastpar.ops import rnn_op

        return getattr(rnn_op, self.triton)

    def recurrence(
        self, backend: Backend, x: Tensor, kernel: Kernel, hidden: int, one_step: bool = False,
        nonlinearity: Nonlinearity = "tanh",
    ) -> Callable[..., Tensor] | None:  # fmt: skip
        """The recurrence ``stack`` runs for ``x`` on ``backend``, or None for torch's kernels."""
        kind = "gru" if self.cell == "GRU" else f"rnn_{nonlinearity}"
        return choose_recurrence(
            backend, x, kernel, kind=kind, hidden=hidden, one_step=one_step,
            reference=self.reference, triton=self._triton,
        )  # fmt: skip

    def run_stack(
        self, backend: Backend, kernel: Kernel, x: Tensor, h0: Tensor,
        weights: list[LayerWeights], **options: Any,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """x (T, B, I), h0 (L*D, B, H) -> output (T, B, D*H), h_n (L*D, B, H)."""
        recurrence = self.recurrence(
            backend, x, kernel, h0.shape[-1], nonlinearity=options.get("nonlinearity", "tanh")
        )
        if recurrence is None:
            return self.stack_aten(x, h0, weights, **options)
        return self.stack(x, h0, weights, recurrence=recurrence, **lengths_on_device(options, x))

    def run_cell(
        self, backend: Backend, x: Tensor, h: Tensor, w: LayerWeights, **options: Any
    ) -> Tensor:
        """x (B, I), h (B, H) -> h_next (B, H): torch's cell op, or one step of a one-layer
        stack (the same recurrence and kernels as the module)."""
        recurrence = self.recurrence(
            backend, x, "auto", h.shape[-1], one_step=True,
            nonlinearity=options.get("nonlinearity", "tanh"),
        )  # fmt: skip
        if recurrence is None:
            return self.cell_aten(x, h, w, **options)
        _, h_n = self.stack(x.unsqueeze(0), h.unsqueeze(0), [w], num_layers=1,
                            bidirectional=False, recurrence=recurrence, **options)  # fmt: skip
        return h_n[0]


GRU_OPS = CellOps(
    cell="GRU",
    stack=gru_stack,
    reference=gru_recurrence_reference,
    triton="gru_recurrence_triton",
    stack_aten=gru_stack_aten,
    cell_aten=gru_cell_aten,
)
RNN_OPS = CellOps(
    cell="RNN",
    stack=rnn_stack,
    reference=rnn_recurrence_reference,
    triton="rnn_recurrence_triton",
    stack_aten=rnn_stack_aten,
    cell_aten=rnn_cell_aten,
)


def _check_nonlinearity(nonlinearity: object) -> Nonlinearity:
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    return nonlinearity  # type: ignore[return-value]


NO_PROJECTION = "proj_size argument is only supported for LSTM, not RNN or GRU"  # torch's words


def _check_no_projection(proj_size: object) -> int:
    # torch's GRU and RNN take proj_size where RNNBase has it (after bidirectional, positionally)
    # but no projection: torch's own message, raised here rather than at the first call.
    if isinstance(proj_size, bool) or proj_size != 0:
        raise ValueError(f"{NO_PROJECTION}, got {proj_size!r}")
    return 0


def _refuse_proj_size_keyword(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that refuses proj_size by keyword at any value, 0 too, as torch's GRU and RNN
    do (the ValueError of their ``__init__(*args, **kwargs)``): they take it only positionally.
    inspect and help still show ``init``'s signature, which names the positional slot."""

    @functools.wraps(init)
    def refusing(self: RecurrentBase, *args: Any, **kwargs: Any) -> None:
        if "proj_size" in kwargs:
            raise ValueError(f"{NO_PROJECTION}, got proj_size={kwargs['proj_size']!r} by keyword")
        init(self, *args, **kwargs)

    return refusing


class _OneStateBase(RecurrentBase):
    """The GRU's and the RNN's stack: one state, h_0."""

    ops: ClassVar[CellOps]
    state_names = ("hx (h_0)",)

    def cell_options(self) -> dict[str, Any]:
        """Keyword arguments of this cell's functions beyond the stack's (the RNN's
        nonlinearity)."""
        return {}

    def _run_stack(
        self, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, h_n = self.ops.run_stack(
            self.backend, self.kernel, x, states[0], self.layer_weights(),
            **self.stack_options(lengths), **self.cell_options(),
        )  # fmt: skip
        return out, (h_n,)


class _OneStateCellBase(RecurrentCellBase):
    """The GRU's and the RNN's cell: one state, h."""

    ops: ClassVar[CellOps]
    state_names = ("hx (h_0)",)

    def cell_options(self) -> dict[str, Any]:
        return {}

    def _step(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (self.ops.run_cell(self.backend, x, states[0], self.weights(),
                                  **self.cell_options()),)  # fmt: skip


class GRU(_OneStateBase):
    """Multi-layer GRU with torch.nn.GRU's interface, parameters and results.

    Arguments: torch.nn.GRU's, as fastpar.nn.LSTM documents them (input_size I, hidden_size H,
    num_layers L, bias, batch_first, dropout, bidirectional, device, dtype), and fastpar's
    backend and kernel, keyword-only (see fastpar.nn.recurrent). proj_size holds torch's
    positional slot (torch's GRU passes its 8th argument to RNNBase's proj_size): only 0, and
    only positionally; by keyword it is torch's ValueError, at any value.

    ``forward(input, hx=None) -> (output, h_n)``: input (T, B, I), (B, T, I) when batch_first,
    (T, I) unbatched, or a PackedSequence; hx = h_0 (L*D, B, H) ((L*D, H) unbatched), zeros when
    omitted. output (T, B, D*H) (or packed), h_n (L*D, B, H).
    """

    cell = "GRU"
    gates = 3
    ops = GRU_OPS

    @_refuse_proj_size_keyword
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: Backend = "auto",
        kernel: Kernel = "auto",
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            _check_no_projection(proj_size), device, dtype, backend, kernel,
        )  # fmt: skip

    @property
    def mode(self) -> str:
        return "GRU"


class RNN(_OneStateBase):
    """Multi-layer Elman RNN with torch.nn.RNN's interface, parameters and results:
    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.

    Arguments:
        input_size, hidden_size, num_layers: as GRU.
        nonlinearity: "tanh" or "relu".
        bias, batch_first, dropout, bidirectional, proj_size, device, dtype, backend, kernel:
            as GRU.

    ``forward(input, hx=None) -> (output, h_n)``, as GRU.
    """

    cell = "RNN"
    gates = 1
    ops = RNN_OPS

    @_refuse_proj_size_keyword
    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: Nonlinearity = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: Backend = "auto",
        kernel: Kernel = "auto",
    ) -> None:
        nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            _check_no_projection(proj_size), device, dtype, backend, kernel,
        )  # fmt: skip
        self.nonlinearity: Nonlinearity = nonlinearity

    @property
    def mode(self) -> str:
        return f"RNN_{self.nonlinearity.upper()}"

    def cell_options(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity}


class GRUCell(_OneStateCellBase):
    """One GRU step with torch.nn.GRUCell's interface, parameters and results.

    Arguments:
        input_size: I; hidden_size: H; bias: use b_ih and b_hh; device, dtype: of the parameters;
        backend: "auto", "triton", "torch" or "reference" (as GRU); keyword-only.

    ``forward(input, hx=None) -> h_1``: input (B, I) or (I,) unbatched; hx = h_0, (B, H) or (H,),
    zeros when omitted.
    """

    cell = "GRU"
    gates = 3
    ops = GRU_OPS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype, backend)


class RNNCell(_OneStateCellBase):
    """One Elman RNN step with torch.nn.RNNCell's interface, parameters and results.

    Arguments:
        input_size: I; hidden_size: H; bias: use b_ih and b_hh; nonlinearity: "tanh" or "relu";
        device, dtype: of the parameters; backend: "auto", "triton", "torch" or "reference",
            keyword-only.

    ``forward(input, hx=None) -> h_1``, as GRUCell.
    """

    cell = "RNN"
    gates = 1
    ops = RNN_OPS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: Nonlinearity = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: Backend = "auto",
    ) -> None:
        nonlinearity = _check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, bias, device, dtype, backend)
        self.nonlinearity: Nonlinearity = nonlinearity

    def cell_options(self) -> dict[str, Any]:
        return {"nonlinearity": self.nonlinearity}


# Allowlisted for torch.load(weights_only=True), as fastpar.nn.LSTM (see there).
torch.serialization.add_safe_globals([GRU, RNN, GRUCell, RNNCell])

__all__ = ["GRU", "GRU_OPS", "RNN", "RNN_OPS", "CellOps", "GRUCell", "RNNCell"]
