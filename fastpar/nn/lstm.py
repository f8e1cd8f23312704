"""``fastpar.nn.LSTM`` and ``fastpar.nn.LSTMCell``: drop-in replacements for torch's modules.

They hold the same parameters as ``torch.nn.LSTM``/``torch.nn.LSTMCell`` (names, shapes, order
and initialisation), so state dicts load in both directions, and pick a backend per call (see
fastpar.nn.recurrent, which they share with the GRU and the RNN):

* ``"triton"``: fastpar's fused Triton kernels (CUDA; float32, bfloat16, float16);
* ``"torch"``: torch's own native LSTM kernels (fastpar.ops.lstm_aten): torch.nn.LSTM's own
  call in eager mode on padded input; under torch.compile and for packed input, one layer and
  direction at a time inside fastpar's custom op, so torch.compile(fullgraph=True) still sees
  no graph break;
* ``"reference"``: the pure-PyTorch loop of fastpar.ops.reference (the test oracle; slow);
* ``"auto"``: triton where a GPU measurement shows it faster than torch (CUDA bfloat16 where the
  persistent kernel applies), torch otherwise (cuDNN on CUDA; CPU; float64), said once in the
  log (see fastpar.ops.auto_backend).

Dimension letters: T time, B batch, I input_size, H hidden_size, P proj_size or H, L num_layers,
D directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpar.nn.recurrent import (
    Backend,
    Kernel,
    RecurrentBase,
    RecurrentCellBase,
    choose_recurrence,
    layer_weights,
    lengths_on_device,
)
from fastpar.ops.lstm_aten import autocast_runs_onednn, lstm_stack_aten
from fastpar.ops.reference import (
    LayerWeights,
    Recurrence,
    lstm_recurrence_reference,
    lstm_stack,
)


def select_recurrence(
    backend: Backend,
    x: Tensor,
    kernel: Kernel = "auto",
    *,
    hidden: int,
    proj: int = 0,
    one_step: bool = False,
) -> Recurrence | None:
    """The single-direction recurrence ``lstm_stack`` runs for ``x``, or None for torch's
    kernels (``lstm_stack_aten``); raises when a named backend cannot run it.

    Arguments:
        backend: "auto", "triton", "torch" or "reference".
        x: the (already validated) input, whose device, dtype and batch decide.
        kernel: the Triton kernel variant (used only when the Triton kernels run).
        hidden: H; proj: proj_size (0: none); one_step: LSTMCell's call.

    Returns:
        A function with the signature of ``lstm_recurrence_reference``, or None.
    """
    return choose_recurrence(
        backend, x, kernel, kind="lstm", hidden=hidden, proj=proj, one_step=one_step,
        reference=lstm_recurrence_reference, triton=_triton_recurrence,
    )  # fmt: skip


def _triton_recurrence() -> Recurrence:
    from fastpar.ops.lstm_op import lstm_recurrence_triton

    return lstm_recurrence_triton


def _run_stack(
    recurrence: Recurrence | None, x: Tensor, h0: Tensor, c0: Tensor,
    weights: list[LayerWeights], **kwargs: object,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    if recurrence is None:
        return lstm_stack_aten(x, h0, c0, weights, **kwargs)  # type: ignore[arg-type]
    kwargs = lengths_on_device(kwargs, x)
    return lstm_stack(x, h0, c0, weights, recurrence=recurrence, **kwargs)  # type: ignore[arg-type]


class LSTM(RecurrentBase):
    """Multi-layer LSTM with torch.nn.LSTM's interface, parameters and results.

    Arguments:
        input_size: I, features per step of the input.
        hidden_size: H, hidden units per layer and direction.
        num_layers: L, stacked layers.
        bias: use b_ih and b_hh.
        batch_first: input and output are (B, T, .) instead of (T, B, .).
        dropout: dropout probability on the outputs of every layer but the last (training only).
        bidirectional: run a second, reversed direction per layer (D = 2).
        proj_size: P > 0 projects h to P units with W_hr (0: none).
        device, dtype: of the parameters.
        backend: "auto", "triton", "torch" or "reference" (see the module docstring);
            keyword-only, as kernel: fastpar's own arguments follow torch's.
        kernel: the Triton kernel variant: "auto" (chosen per shape), "step" (one launch per
            time step) or "persistent" (one launch for the whole sequence, where it applies).
            Only the Triton kernels read it: with backend="auto" it is ignored where auto takes
            torch's kernels, and "step" makes auto take them on CUDA too (the step kernel was
            measured slower than cuDNN); with backend="torch" or "reference" anything but
            "auto" is an error.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``: input (T, B, I), (B, T, I) when
    batch_first, (T, I) unbatched, or a PackedSequence; hx = (h_0 (L*D, B, P), c_0 (L*D, B, H)),
    zeros when omitted. output (T, B, D*P) (or packed), h_n (L*D, B, P), c_n (L*D, B, H).
    """

    cell = "LSTM"
    gates = 4
    state_names = ("hx[0] (h_0)", "hx[1] (c_0)")

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
            proj_size, device, dtype, backend, kernel,
        )  # fmt: skip

    @property
    def mode(self) -> str:
        return "LSTM"

    def state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _run_stack(
        self, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        h0, c0 = states
        weights = self.layer_weights()
        recurrence = select_recurrence(
            self.backend, x, self.kernel, hidden=self.hidden_size, proj=self.proj_size
        )
        if recurrence is not None and autocast_runs_onednn(x, weights[0].w_hr, lengths):
            # Results in torch.nn.LSTM's dtypes: states in autocast's dtype keep fastpar's loop
            # (reference, Triton) there, as oneDNN's cast layer does; float32 states would
            # keep c_n float32, as torch's own loop does (lstm_stack).
            dtype = torch.get_autocast_dtype(x.device.type)
            h0, c0 = h0.to(dtype), c0.to(dtype)
        out, h_n, c_n = _run_stack(recurrence, x, h0, c0, weights, **self.stack_options(lengths))
        return out, (h_n, c_n)


class LSTMCell(RecurrentCellBase):
    """One LSTM step with torch.nn.LSTMCell's interface, parameters and results.

    Arguments:
        input_size: I; hidden_size: H; bias: use b_ih and b_hh; device, dtype: of the parameters;
        backend: "auto", "triton", "torch" or "reference" (as LSTM; "torch" makes
            torch.nn.LSTMCell's own call, ``torch._VF.lstm_cell``); keyword-only.

    ``forward(input, hx=None) -> (h_1, c_1)``: input (B, I) or (I,) unbatched; hx = (h_0, c_0),
    each (B, H) or (H,), zeros when omitted.
    """

    cell = "LSTM"
    gates = 4
    state_names = ("hx[0] (h_0)", "hx[1] (c_0)")

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

    def _step(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        h0, c0 = states
        w = self.weights()
        recurrence = select_recurrence(self.backend, x, hidden=self.hidden_size, one_step=True)
        if recurrence is None:
            # torch.nn.LSTMCell's own call, as GRUCell and RNNCell make theirs: its results, and
            # its dtypes under autocast (a float32 c_0 keeps the state float32), which the
            # one-step stack below (all in autocast's dtype) does not give.
            h_1, c_1 = torch._VF.lstm_cell(x, (h0, c0), w.w_ih, w.w_hh, w.b_ih, w.b_hh)
            return h_1, c_1
        # One step of a one-layer LSTM: the same recurrence (and kernels) as LSTM.
        _, h_n, c_n = _run_stack(
            recurrence, x.unsqueeze(0), h0.unsqueeze(0),
            c0.unsqueeze(0), [w], num_layers=1, bidirectional=False,
        )  # fmt: skip
        return h_n[0], c_n[0]


# A whole model saved with torch.save(model) pickles these classes by name; torch.load's default
# weights_only=True unpickler only rebuilds allowlisted globals, so fastpar's modules are
# allowlisted as soon as fastpar.nn is imported (the user allowlists their own model classes).
torch.serialization.add_safe_globals([LSTM, LSTMCell])

__all__ = ["LSTM", "LSTMCell", "layer_weights", "select_recurrence"]
