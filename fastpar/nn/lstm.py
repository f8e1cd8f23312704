"""``fastpar.nn.LSTM`` and ``fastpar.nn.LSTMCell``: drop-in replacements for torch's modules.

They hold the same parameters as ``torch.nn.LSTM``/``torch.nn.LSTMCell`` (names, shapes, order
and initialisation), so state dicts load in both directions, and pick a backend per call:

* ``"triton"``: fastpar's fused Triton kernels (CUDA; float32, bfloat16, float16);
* ``"torch"``: torch's own native LSTM kernels (fastpar.ops.lstm_aten): torch.nn.LSTM's own
  call in eager mode on padded input; under torch.compile and for packed input, one layer and
  direction at a time inside fastpar's custom op, so torch.compile(fullgraph=True) still sees
  no graph break;
* ``"reference"``: the pure-PyTorch loop of fastpar.ops.reference (the test oracle; slow);
* ``"auto"``: triton for CUDA tensors of a Triton dtype, torch otherwise (CPU, float64), said
  once in the log.

Dimension letters: T time, B batch, I input_size, H hidden_size, P proj_size or H, L num_layers,
D directions.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastpar._checks import check_int_at_least
from fastpar._logging import get_logger, log_once
from fastpar.ops import interpreter_active
from fastpar.ops.lstm_aten import lstm_stack_aten
from fastpar.ops.reference import (
    LayerWeights,
    Recurrence,
    lstm_recurrence_reference,
    lstm_stack,
)

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The Triton recurrence's kernel variant: "auto" lets it choose per shape; "step" launches one
# kernel per time step; "persistent" runs the whole sequence in one launch (where it applies).
Kernel = Literal["auto", "step", "persistent"]
KERNELS: tuple[str, ...] = get_args(Kernel)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_log = get_logger(__name__)


def _check_backend(backend: object) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def _check_kernel(kernel: object, backend: Backend) -> Kernel:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto" and backend not in ("auto", "triton"):
        raise ValueError(
            f"kernel={kernel!r} chooses a Triton kernel variant, but backend={backend!r} runs "
            "no Triton kernel; use backend='triton' or 'auto', or leave kernel='auto'"
        )
    return kernel  # type: ignore[return-value]


def _takes_triton(backend: Backend, x: Tensor) -> bool:
    """Whether ``backend`` runs the Triton kernels for ``x``; raises when backend='triton'
    cannot run them."""
    if backend in ("torch", "reference"):
        return False
    if backend == "auto":
        if x.device.type == "cuda" and x.dtype in TRITON_DTYPES:
            return True
        if not torch.compiler.is_compiling():  # the eager call before compiling said it
            log_once(
                _log,
                f"fastpar LSTM backend='auto': {x.dtype} input on {x.device.type} runs torch's "
                "native LSTM kernels (backend='torch'; the Triton kernels need CUDA and "
                "float32/bfloat16/float16)",
            )
        return False
    if x.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got input on {x.device}; set "
            "TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter, or use "
            "backend='torch'"
        )
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' supports {TRITON_DTYPES}, got input of {x.dtype}; use "
            "backend='torch' (or 'auto', which takes it for float64)"
        )
    return True


def select_recurrence(backend: Backend, x: Tensor, kernel: Kernel = "auto") -> Recurrence | None:
    """The single-direction recurrence ``lstm_stack`` runs for ``x``, or None for torch's
    kernels (``lstm_stack_aten``); raises when a named backend cannot run it.

    Arguments:
        backend: "auto", "triton", "torch" or "reference".
        x: the (already validated) input, whose device and dtype decide.
        kernel: the Triton kernel variant (used only when the Triton kernels run).

    Returns:
        A function with the signature of ``lstm_recurrence_reference``, or None.
    """
    if backend == "reference":
        return lstm_recurrence_reference
    if not _takes_triton(backend, x):
        return None
    from fastpar.ops.lstm_op import lstm_recurrence_triton

    return functools.partial(lstm_recurrence_triton, kernel=kernel)


def _run_stack(
    recurrence: Recurrence | None, x: Tensor, h0: Tensor, c0: Tensor,
    weights: list[LayerWeights], **kwargs: object,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    if recurrence is None:
        return lstm_stack_aten(x, h0, c0, weights, **kwargs)  # type: ignore[arg-type]
    return lstm_stack(x, h0, c0, weights, recurrence=recurrence, **kwargs)  # type: ignore[arg-type]


def _check_input(x: Tensor, input_size: int, weight: Tensor, batched_dims: int) -> bool:
    """Validate the input tensor; returns whether it is batched."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor or PackedSequence, got {type(x).__name__}")
    if x.dim() not in (batched_dims - 1, batched_dims):
        raise ValueError(
            f"input must have {batched_dims - 1} (unbatched) or {batched_dims} (batched) "
            f"dimensions, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != input_size:
        raise ValueError(
            f"input.size(-1) must be equal to input_size {input_size}, got shape {tuple(x.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"input dtype {x.dtype} does not match the parameters' dtype {weight.dtype}; "
            "convert the module with .to(dtype)"
        )
    if x.device != weight.device:
        raise ValueError(
            f"input is on {x.device} but the parameters are on {weight.device}; "
            "move the module with .to(device)"
        )
    return x.dim() == batched_dims


def _check_state(name: str, state: object, expected: tuple[int, ...], x: Tensor) -> Tensor:
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(state.shape)}")
    if state.dtype != x.dtype:
        raise TypeError(f"{name} dtype {state.dtype} does not match input dtype {x.dtype}")
    if state.device != x.device:
        raise ValueError(f"{name} is on {state.device} but input is on {x.device}")
    return state


def _unpack_hx(hx: object, name: str) -> tuple[object, object]:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{name} must be a tuple (h_0, c_0) of two Tensors, got {type(hx)}")
    return hx[0], hx[1]


def _init_uniform(params: list[Tensor], hidden_size: int) -> None:
    # torch.nn.LSTM's initialisation, drawn in the same order: same seed, same weights.
    stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    with torch.no_grad():
        for p in params:
            p.uniform_(-stdv, stdv)


class LSTM(nn.Module):
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
        backend: "auto", "triton", "torch" or "reference" (see the module docstring).
        kernel: the Triton kernel variant: "auto" (chosen per shape), "step" (one launch per
            time step) or "persistent" (one launch for the whole sequence, where it applies).
            Only the Triton kernels read it: with backend="auto" it is ignored where auto takes
            torch's kernels (CPU, float64); with backend="torch" or "reference" anything but
            "auto" is an error.

    ``forward(input, hx=None) -> (output, (h_n, c_n))``: input (T, B, I), (B, T, I) when
    batch_first, (T, I) unbatched, or a PackedSequence; hx = (h_0 (L*D, B, P), c_0 (L*D, B, H)),
    zeros when omitted. output (T, B, D*P) (or packed), h_n (L*D, B, P), c_n (L*D, B, H).
    """

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
        backend: Backend = "auto",
        kernel: Kernel = "auto",
    ) -> None:
        super().__init__()
        self.input_size = check_int_at_least("input_size", input_size)
        self.hidden_size = check_int_at_least("hidden_size", hidden_size)
        self.num_layers = check_int_at_least("num_layers", num_layers)
        self.proj_size = check_int_at_least("proj_size", proj_size, minimum=0)
        if self.proj_size >= hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size {hidden_size}, got {proj_size}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout acts between layers: with num_layers=1 it has no effect "
                f"(dropout={dropout})",
                stacklevel=2,
            )
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.backend: Backend = _check_backend(backend)
        self.kernel: Kernel = _check_kernel(kernel, self.backend)
        factory = {"device": device, "dtype": dtype}
        num_dirs = 2 if bidirectional else 1
        h_out = self.proj_size or hidden_size
        gates = 4 * hidden_size
        for layer in range(num_layers):
            for direction in range(num_dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                in_size = input_size if layer == 0 else h_out * num_dirs
                self.register_parameter(
                    "weight_ih" + sfx, nn.Parameter(torch.empty(gates, in_size, **factory))
                )
                self.register_parameter(
                    "weight_hh" + sfx, nn.Parameter(torch.empty(gates, h_out, **factory))
                )
                if bias:
                    self.register_parameter(
                        "bias_ih" + sfx, nn.Parameter(torch.empty(gates, **factory))
                    )
                    self.register_parameter(
                        "bias_hh" + sfx, nn.Parameter(torch.empty(gates, **factory))
                    )
                if self.proj_size > 0:
                    self.register_parameter(
                        "weight_hr" + sfx,
                        nn.Parameter(torch.empty(self.proj_size, hidden_size, **factory)),
                    )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.LSTM."""
        _init_uniform(list(self.parameters()), self.hidden_size)

    def flatten_parameters(self) -> None:
        """Does nothing: kept so code written for torch.nn.LSTM (which packs its weights for
        cuDNN here) runs unchanged; the kernels read the parameters where they are."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as torch.nn.LSTM.all_weights."""
        return [[p for p in w if p is not None] for w in self.layer_weights()]

    def layer_weights(self) -> list[LayerWeights]:
        """The parameters per layer and direction, in the order of h_0's first dimension."""
        return layer_weights(self, self.num_layers, 2 if self.bidirectional else 1)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        s += f", backend={self.backend!r}"
        return s + (f", kernel={self.kernel!r}" if self.kernel != "auto" else "")

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        weight = self.weight_ih_l0
        lengths = None
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I) in the caller's batch order
            lengths = lengths.to(x.device)
            batched = _check_input(x, self.input_size, weight, 3)
        else:
            batched = _check_input(input, self.input_size, weight, 3)
            x = input if batched else input.unsqueeze(1)
            if self.batch_first and batched:
                x = x.transpose(0, 1)
        num_dirs = 2 if self.bidirectional else 1
        batch = x.shape[1]
        h_out = self.proj_size or self.hidden_size
        h_shape = (self.num_layers * num_dirs, batch, h_out)
        c_shape = (self.num_layers * num_dirs, batch, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(h_shape)
            c0 = x.new_zeros(c_shape)
        else:
            h0, c0 = _unpack_hx(hx, "hx")
            if batched:
                h0 = _check_state("hx[0] (h_0)", h0, h_shape, x)
                c0 = _check_state("hx[1] (c_0)", c0, c_shape, x)
            else:
                h0 = _check_state("hx[0] (h_0)", h0, (h_shape[0], h_shape[2]), x).unsqueeze(1)
                c0 = _check_state("hx[1] (c_0)", c0, (c_shape[0], c_shape[2]), x).unsqueeze(1)

        out, h_n, c_n = _run_stack(
            select_recurrence(self.backend, x, self.kernel), x, h0, c0, self.layer_weights(),
            num_layers=self.num_layers, bidirectional=self.bidirectional,
            dropout=self.dropout, training=self.training, lengths=lengths,
        )  # fmt: skip

        if packed:
            return _repack(out, lengths, input), (h_n, c_n)
        if not batched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)


def _repack(out: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack ``out`` (T, B, .) exactly as ``like`` is packed (same batch_sizes and indices)."""
    if like.sorted_indices is None:
        packed = pack_padded_sequence(out, lengths.cpu(), enforce_sorted=True)
        return PackedSequence(packed.data, like.batch_sizes, None, None)
    order = like.sorted_indices.to(out.device)
    packed = pack_padded_sequence(
        out.index_select(1, order), lengths.index_select(0, order).cpu(), enforce_sorted=True
    )
    return PackedSequence(packed.data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def layer_weights(module: nn.Module, num_layers: int, num_dirs: int) -> list[LayerWeights]:
    """LayerWeights of a module with torch.nn.LSTM's parameter names (torch's or fastpar's).

    Arguments:
        module: holds weight_ih_l{k}[_reverse], weight_hh_..., optional bias_ih_..., bias_hh_...,
            weight_hr_....
        num_layers: L.
        num_dirs: D.

    Returns:
        L*D LayerWeights, layer-major then direction.
    """
    weights = []
    for layer in range(num_layers):
        for direction in range(num_dirs):
            sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            weights.append(
                LayerWeights(
                    getattr(module, "weight_ih" + sfx),
                    getattr(module, "weight_hh" + sfx),
                    getattr(module, "bias_ih" + sfx, None),
                    getattr(module, "bias_hh" + sfx, None),
                    getattr(module, "weight_hr" + sfx, None),
                )
            )
    return weights


class LSTMCell(nn.Module):
    """One LSTM step with torch.nn.LSTMCell's interface, parameters and results.

    Arguments:
        input_size: I; hidden_size: H; bias: use b_ih and b_hh; device, dtype: of the parameters;
        backend: "auto", "triton", "torch" or "reference" (as LSTM).

    ``forward(input, hx=None) -> (h_1, c_1)``: input (B, I) or (I,) unbatched; hx = (h_0, c_0),
    each (B, H) or (H,), zeros when omitted.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.input_size = check_int_at_least("input_size", input_size)
        self.hidden_size = check_int_at_least("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.backend: Backend = _check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn.LSTMCell."""
        _init_uniform(list(self.parameters()), self.hidden_size)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}, backend={self.backend!r}"

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        batched = _check_input(input, self.input_size, self.weight_ih, 2)
        x = input if batched else input.unsqueeze(0)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(shape)
        else:
            h0, c0 = _unpack_hx(hx, "hx")
            expected = shape if batched else (self.hidden_size,)
            h0 = _check_state("hx[0] (h_0)", h0, expected, x).reshape(shape)
            c0 = _check_state("hx[1] (c_0)", c0, expected, x).reshape(shape)
        w = LayerWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)
        # One step of a one-layer LSTM: the same recurrence (and kernels) as LSTM.
        _, h_n, c_n = _run_stack(
            select_recurrence(self.backend, x), x.unsqueeze(0), h0.unsqueeze(0),
            c0.unsqueeze(0), [w], num_layers=1, bidirectional=False,
        )  # fmt: skip
        if not batched:
            return h_n[0, 0], c_n[0, 0]
        return h_n[0], c_n[0]


# A whole model saved with torch.save(model) pickles these classes by name; torch.load's default
# weights_only=True unpickler only rebuilds allowlisted globals, so fastpar's modules are
# allowlisted as soon as fastpar.nn is imported (the user allowlists their own model classes).
torch.serialization.add_safe_globals([LSTM, LSTMCell])

__all__ = ["LSTM", "LSTMCell", "layer_weights", "select_recurrence"]
