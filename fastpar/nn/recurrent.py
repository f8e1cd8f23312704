"""What fastpar's recurrent modules share: ``RecurrentBase`` (LSTM, GRU, RNN) and
``RecurrentCellBase`` (their cells), and the backend choice.

A subclass names its cell (``cell``, ``gates`` per hidden unit, ``state_names``) and runs the
stack or the step on the chosen backend; everything else lives here once: constructor checks,
parameters with torch's names, shapes, order and initialisation, input and state checks (from
``fastpar.nn.inputs``), batch_first, unbatched and packed input, and the backend choice:

* ``"triton"``: fastpar's Triton recurrence (CUDA, or Triton's interpreter; float32, bfloat16,
  float16); ``kernel`` chooses its variant;
* ``"torch"``: torch's own native kernels (``fastpar.ops.lstm_aten``, ``fastpar.ops.rnn_aten``);
* ``"reference"``: the pure-PyTorch loop (the test oracle; slow);
* ``"auto"``: triton only where a GPU measurement shows it faster than torch's own module (on
  CUDA: bfloat16 where the persistent kernel applies), torch's kernels (cuDNN on CUDA) everywhere
  else; ``fastpar.ops.auto_backend`` holds the measurements and the rule. The choice and its
  reason are said once in the log.

A backend named explicitly either runs or raises.

Dimension letters: T time, B batch, I input_size, H hidden_size, P proj_size or H (the size of
h), L num_layers, D directions, G gates per hidden unit (4 LSTM, 3 GRU, 1 RNN).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastpar._checks import check_bool, check_choice, check_int_at_least
from fastpar._logging import get_logger, log_once
from fastpar.nn.inputs import (
    ShapeMismatchError,
    check_input,
    check_state,
    compute_dtype,
    join_states,
    split_hx,
)
from fastpar.ops import interpreter_active
from fastpar.ops.auto_backend import choose_auto_backend
from fastpar.ops.packing import PackedLayout
from fastpar.ops.reference import LayerWeights

Backend = Literal["auto", "triton", "torch", "reference"]
BACKENDS: tuple[str, ...] = get_args(Backend)
# The Triton recurrence's kernel variant: "auto" lets it choose per shape; "step" launches one
# kernel per time step; "persistent" runs the whole sequence in one launch (where it applies).
Kernel = Literal["auto", "step", "persistent"]
KERNELS: tuple[str, ...] = get_args(Kernel)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_log = get_logger(__name__)


def check_backend(backend: object) -> Backend:
    check_choice("backend", backend, BACKENDS)
    return backend  # type: ignore[return-value]


def check_kernel(kernel: object, backend: Backend) -> Kernel:
    check_choice("kernel", kernel, KERNELS)
    if kernel != "auto" and backend not in ("auto", "triton"):
        raise ValueError(
            f"kernel={kernel!r} chooses a Triton kernel variant, but backend={backend!r} runs "
            "no Triton kernel; use backend='triton' or 'auto', or leave kernel='auto'"
        )
    return kernel  # type: ignore[return-value]


def takes_triton(
    backend: Backend,
    x: Tensor,
    kind: str,
    *,
    hidden: int,
    proj: int = 0,
    kernel: Kernel = "auto",
    one_step: bool = False,
) -> bool:
    """Whether ``backend`` runs the Triton kernels for ``x``; raises when backend='triton'
    cannot run them.

    Arguments:
        backend: "auto", "triton", "torch" or "reference".
        x: the (already validated) input, (T, B, I) or, for a cell, (B, I).
        kind: the cell, "lstm", "gru", "rnn_tanh" or "rnn_relu".
        hidden: H; proj: the LSTM's proj_size (0: none); kernel: the module's Triton variant;
        one_step: a cell module. "auto" decides with these (``choose_auto_backend``).
    """
    cell = kind.split("_")[0].upper()  # "LSTM", "GRU", "RNN", for messages
    if backend in ("torch", "reference"):
        return False
    if backend == "auto":
        choice = choose_auto_backend(
            kind, x.device, compute_dtype(x), batch=x.shape[-2], hidden=hidden, proj=proj,
            kernel=kernel, backward=torch.is_grad_enabled(), one_step=one_step,
        )  # fmt: skip
        if not torch.compiler.is_compiling():  # the eager call before compiling said it
            runs = (
                "fastpar's Triton kernels"
                if choice.backend == "triton"
                else f"torch's native {cell} kernels (backend='torch')"
            )
            log_once(_log, f"fastpar {cell} backend='auto' runs {runs}: {choice.reason}")
        return choice.backend == "triton"
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


def choose_recurrence(
    backend: Backend,
    x: Tensor,
    kernel: Kernel,
    *,
    kind: str,
    hidden: int,
    proj: int = 0,
    one_step: bool = False,
    reference: Callable[..., Any],
    triton: Callable[[], Callable[..., Any]],
) -> Callable[..., Any] | None:
    """The single-direction recurrence a stack runs for ``x``, or None for torch's kernels.

    Arguments:
        backend: "auto", "triton", "torch" or "reference".
        x: the (already validated) input, whose device, dtype and batch decide.
        kernel: the Triton kernel variant (used only when the Triton kernels run).
        kind, hidden, proj, one_step: the cell and its sizes (see ``takes_triton``).
        reference: the pure-PyTorch recurrence.
        triton: returns the Triton recurrence, importing it (the Triton modules import
            Triton, so only the calls that run them do; with an import statement, which
            torch.compile traces, where importlib would break the graph).

    Returns:
        ``reference``, the Triton recurrence with ``kernel`` bound, or None.
    """
    if backend == "reference":
        return reference
    if not takes_triton(
        backend, x, kind, hidden=hidden, proj=proj, kernel=kernel, one_step=one_step
    ):
        return None
    return functools.partial(triton(), kernel=kernel)


def init_uniform(params: list[Tensor], hidden_size: int) -> None:
    # torch's initialisation of its recurrent modules, drawn in the same order: same seed, same
    # weights.
    stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    with torch.no_grad():
        for p in params:
            p.uniform_(-stdv, stdv)


def _check_dropout(dropout: object, num_layers: int) -> float:
    # torch's modules raise ValueError for any dropout that is not a real number in [0, 1], a
    # bool or a string too: the same type here, so code written for them catches it. numpy's
    # floats are real numbers, as torch takes them.
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not 0.0 <= float(dropout) <= 1.0
    ):
        raise ValueError(f"dropout must be in [0, 1] (a probability), got {dropout!r}")
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            f"dropout acts between layers: with num_layers=1 it has no effect (dropout={dropout})",
            stacklevel=4,  # the user's call of the module's constructor
        )
    return float(dropout)


# What torch's LSTM, GRU and RNN keep in their state and fastpar derives (properties here: the
# weight lists from the parameters, mode from the class) or never keeps (weak references).
_TORCH_DERIVED_STATE = frozenset(
    ("_flat_weights", "_flat_weights_names", "_all_weights", "all_weights", "_flat_weight_refs",
     "mode")
)  # fmt: skip


class RecurrentBase(nn.Module):
    """A multi-layer recurrent network with torch's RNNBase interface, parameters and results.

    Subclasses set ``cell``, ``gates`` and ``state_names``, and implement ``_run_stack``.
    The constructor arguments are torch's, in torch's positions (see fastpar.nn.LSTM, GRU, RNN),
    then fastpar's own ``backend`` and ``kernel``, keyword-only (see the module docstring): a
    positional argument past torch's last is an error, as with torch's modules.

    ``forward(input, hx=None) -> (output, h_n)``: input (T, B, I), (B, T, I) when batch_first,
    (T, I) unbatched, or a PackedSequence; hx: each state (L*D, B, .) ((L*D, .) unbatched), zeros
    when omitted; output (T, B, D*P) (or packed, or (B, T, D*P) when batch_first).
    """

    cell: ClassVar[str]  # "LSTM", "GRU", "RNN": names the kernels in messages
    gates: ClassVar[int]  # G: rows of W_ih and W_hh per hidden unit
    state_names: ClassVar[tuple[str, ...]]  # how messages name each state of hx

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        proj_size: int,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        backend: Backend,
        kernel: Kernel,
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
        self.dropout = _check_dropout(dropout, num_layers)
        # The flags torch checks (a TypeError naming the argument). bidirectional torch takes as
        # truthy and keeps as given (its repr shows "bidirectional=1"): so does fastpar, and
        # reads it through num_directions.
        self.bias = check_bool("bias", bias)
        self.batch_first = check_bool("batch_first", batch_first)
        self.bidirectional = bidirectional
        self.backend: Backend = check_backend(backend)
        self.kernel: Kernel = check_kernel(kernel, self.backend)
        factory = {"device": device, "dtype": dtype}
        num_dirs = 2 if bidirectional else 1
        h_out = self.proj_size or hidden_size
        rows = self.gates * hidden_size
        for layer in range(num_layers):
            for direction in range(num_dirs):
                sfx = weight_suffix(layer, direction)
                in_size = input_size if layer == 0 else h_out * num_dirs
                shapes = {"weight_ih": (rows, in_size), "weight_hh": (rows, h_out)}
                if bias:
                    shapes.update(bias_ih=(rows,), bias_hh=(rows,))
                if self.proj_size > 0:
                    shapes["weight_hr"] = (self.proj_size, hidden_size)
                for name, shape in shapes.items():
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling: fastpar's state, an older fastpar's, or a torch.nn LSTM's, GRU's or RNN's
        (its ``__getstate__``, or a whole pickled torch model whose classes an unpickler maps to
        fastpar's): the weight lists torch keeps are derived here, and options a state lacks
        take their defaults (proj_size 0, as torch's own ``__setstate__``; backend and kernel
        "auto")."""
        state = {k: v for k, v in state.items() if k not in _TORCH_DERIVED_STATE}
        state.setdefault("proj_size", 0)
        state.setdefault("backend", "auto")
        state.setdefault("kernel", "auto")
        super().__setstate__(state)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch."""
        init_uniform(list(self.parameters()), self.hidden_size)

    def flatten_parameters(self) -> None:
        """Does nothing: kept so code written for torch's modules (which pack their weights for
        cuDNN here) runs unchanged; the kernels read the parameters where they are."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as torch's ``all_weights``."""
        return [[p for p in w if p is not None] for w in self.layer_weights()]

    # torch's private weight lists, which code written for torch's modules reads (e.g. to find
    # or cast the weights); derived from the parameters, so they never go stale.
    @property
    def _all_weights(self) -> list[list[str]]:
        """The parameter names per layer and direction, as torch's ``_all_weights``."""
        names = ["weight_ih", "weight_hh"] + ["bias_ih", "bias_hh"] * self.bias
        names += ["weight_hr"] * bool(self.proj_size)
        return [
            [n + weight_suffix(layer, direction) for n in names]
            for layer in range(self.num_layers)
            for direction in range(self.num_directions)
        ]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The parameters in torch's flat order (its ``_flat_weights``)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    def layer_weights(self) -> list[LayerWeights]:
        """The parameters per layer and direction, in the order of h_0's first dimension."""
        return layer_weights(self, self.num_layers, self.num_directions)

    def state_sizes(self) -> tuple[int, ...]:
        """The last dimension of each state of hx: (P,) or, for the LSTM, (P, H)."""
        return (self.proj_size or self.hidden_size,)

    def extra_repr(self) -> str:
        # torch's repr, then what torch's leaves out (the RNN's nonlinearity) and fastpar's own.
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.bidirectional is not False:  # as torch's: bidirectional=0 shows too
            s += f", bidirectional={self.bidirectional}"
        nonlinearity = getattr(self, "nonlinearity", "tanh")
        if nonlinearity != "tanh":
            s += f", nonlinearity={nonlinearity!r}"
        s += f", backend={self.backend!r}"
        return s + (f", kernel={self.kernel!r}" if self.kernel != "auto" else "")

    def _run_stack(
        self, x: Tensor, states: tuple[Tensor, ...], lengths: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The stack on the chosen backend: x (T, B, I) -> output (T, B, D*P) (zero past each
        length) and the final states, each (L*D, B, .)."""
        raise NotImplementedError

    def stack_options(self, lengths: Tensor | None) -> dict[str, Any]:
        """The keyword arguments every stack function takes, from this module's options."""
        return {
            "num_layers": self.num_layers,
            "bidirectional": self.num_directions == 2,
            "dropout": self.dropout,
            "training": self.training,
            "lengths": lengths,
        }

    def forward(
        self, input: Tensor | PackedSequence, hx: Any = None
    ) -> tuple[Tensor | PackedSequence, Any]:
        weight = self.weight_ih_l0
        lengths = None
        layout = None
        if isinstance(input, PackedSequence):
            # (T, B, I) in the packed batch's sorted order, as torch's modules run; lengths stay
            # on the CPU, where torch's kernels take them (``lengths_on_device`` moves them for
            # the other stacks): a copy to the GPU and back would wait for the GPU.
            layout = PackedLayout(input.batch_sizes, input.data.device)
            x, lengths = layout.pad(input.data), layout.lengths
            batched = check_input(x, self.input_size, weight, 3)
        else:
            batched = check_input(input, self.input_size, weight, 3)
            x = input if batched else input.unsqueeze(1)
            if self.batch_first and batched:
                x = x.transpose(0, 1)
            if x.shape[0] == 0:  # torch's modules refuse it too; the stacks would fail obscurely
                raise ShapeMismatchError(
                    f"input has no time steps (shape {tuple(input.shape)}, batch_first="
                    f"{self.batch_first}): the sequence length must be at least 1"
                )
        rows = self.num_layers * self.num_directions
        shapes = [(rows, x.shape[1], size) for size in self.state_sizes()]
        if hx is None:
            states = tuple(x.new_zeros(shape) for shape in shapes)
        else:
            given = split_hx(hx, self.state_names)
            states = tuple(
                check_state(name, s, shape if batched else (rows, shape[2]), x, weight)
                for name, s, shape in zip(self.state_names, given, shapes, strict=True)
            )
            if not batched:
                states = tuple(s.unsqueeze(1) for s in states)
            if layout is not None and input.sorted_indices is not None:
                states = tuple(s.index_select(1, input.sorted_indices) for s in states)

        out, finals = self._run_stack(x, states, lengths)

        if layout is not None:
            if input.unsorted_indices is not None:
                finals = tuple(s.index_select(1, input.unsorted_indices) for s in finals)
            data = layout.pack(out)
            packed_out = PackedSequence(
                data, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
            return packed_out, join_states(finals)
        if not batched:
            return out.squeeze(1), join_states(tuple(s.squeeze(1) for s in finals))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, join_states(finals)


def lengths_on_device(options: dict[str, Any], x: Tensor) -> dict[str, Any]:
    """A stack's ``options`` with their lengths on x's device, where the reference and Triton
    stacks use them (torch's kernels take them on the CPU, as ``forward`` keeps them)."""
    lengths = options.get("lengths")
    if lengths is None:
        return options
    # Not blocking: a blocking copy would wait for every kernel queued before it.
    return {**options, "lengths": lengths.to(x.device, non_blocking=True)}


def weight_suffix(layer: int, direction: int) -> str:
    """The suffix of torch's recurrent parameter names: "_l{layer}", "_reverse" for direction 1."""
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


def layer_weights(module: nn.Module, num_layers: int, num_dirs: int) -> list[LayerWeights]:
    """LayerWeights of a module with torch's recurrent parameter names (torch's or fastpar's
    LSTM, GRU or RNN).

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
            sfx = weight_suffix(layer, direction)
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


class RecurrentCellBase(nn.Module):
    """One step of a recurrent cell with torch's RNNCellBase interface, parameters and results.

    Subclasses set ``cell``, ``gates`` and ``state_names`` and implement ``_step``.

    ``forward(input, hx=None)``: input (B, I) or (I,) unbatched; each state of hx (B, H) or (H,),
    zeros when omitted; returns the next states in hx's form.
    """

    cell: ClassVar[str]
    gates: ClassVar[int]
    state_names: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        backend: Backend,
    ) -> None:
        super().__init__()
        self.input_size = check_int_at_least("input_size", input_size)
        self.hidden_size = check_int_at_least("hidden_size", hidden_size)
        self.bias = bias  # torch's cells take it as truthy and keep it as given, as its repr shows
        self.backend: Backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        rows = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, also a torch.nn cell's state (as ``RecurrentBase.__setstate__``):
        backend "auto" where the state has none."""
        super().__setstate__({"backend": "auto", **state})

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch."""
        init_uniform(list(self.parameters()), self.hidden_size)

    def extra_repr(self) -> str:
        # torch's repr (bias and the RNN's nonlinearity only where not the default), then the
        # backend.
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:  # as torch's: bias=1 shows too
            s += f", bias={self.bias}"
        nonlinearity = getattr(self, "nonlinearity", "tanh")
        if nonlinearity != "tanh":
            s += f", nonlinearity={nonlinearity}"
        return s + f", backend={self.backend!r}"

    def weights(self) -> LayerWeights:
        return LayerWeights(self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, None)

    def _step(self, x: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """One step on the chosen backend: x (B, I), states each (B, H) -> the next states."""
        raise NotImplementedError

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        batched = check_input(input, self.input_size, self.weight_ih, 2)
        x = input if batched else input.unsqueeze(0)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            states = tuple(x.new_zeros(shape) for _ in self.state_names)
        else:
            expected = shape if batched else (self.hidden_size,)
            given = split_hx(hx, self.state_names)
            states = tuple(
                check_state(name, s, expected, x, self.weight_ih).reshape(shape)
                for name, s in zip(self.state_names, given, strict=True)
            )
        finals = self._step(x, states)
        if not batched:
            finals = tuple(s[0] for s in finals)
        return join_states(finals)


__all__ = [
    "BACKENDS",
    "KERNELS",
    "Backend",
    "Kernel",
    "RecurrentBase",
    "RecurrentCellBase",
    "choose_recurrence",
    "layer_weights",
    "lengths_on_device",
    "takes_triton",
]
