"""What the custom ops on torch's native recurrent kernels share (``lstm_aten``, ``rnn_aten``).

* ``Arrangement``: lengths and reversal. A layer runs forward in time on a canonical batch: rows
  sorted by length (longest first, so the rows still running at step t are a prefix of size
  batch_sizes[t]) and, for the reverse direction, each sequence's valid steps reversed in time.
  Its results are then put back in the caller's arrangement.
* ``vf_layer`` / ``vf_whole_stack``: one layer and direction, or a whole stack, through torch's
  ``torch._VF`` calls (``lstm``, ``gru``, ``rnn_tanh``, ``rnn_relu``), which take the same
  arguments apart from the states.
* ``eager_whole_stack``: when the stack is torch's own single call rather than the per-layer op.
* ``autocast_layer``: custom ops are outside autocast's op lists, so a layer takes autocast's
  dtype itself, as torch's modules do (``autocast_dtypes`` gives its results torch's dtypes).
* ``backward_inputs``: the canonical tensors every recompute backward starts from.
* ``without_autocast``: a recompute backward runs in its own dtypes, also when autograd runs it
  inside an autocast region.

Glossary: T time, B batch, I input features, P size of h.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from fastpar.ops.func_transforms import differentiating_transform_active
from fastpar.ops.packing import PackedLayout, batch_sizes_of, checked_lengths, take_rows
from fastpar.ops.reference import LayerWeights

_P = ParamSpec("_P")
_R = TypeVar("_R")

# torch._VF.lstm / gru / rnn_tanh / rnn_relu: (out, *final states).
VFCall = Callable[..., Any]


class Arrangement:
    """Maps (T, B, .) tensors to and from the canonical arrangement described above."""

    def __init__(self, lengths: Tensor | None, reverse: bool, steps: int) -> None:
        self.reverse = reverse
        self.perm: Tensor | None = None
        self.batch_sizes: list[int] | None = None  # (T,) rows running at each step
        self.packed_sizes = torch.empty(0, dtype=torch.int64)  # see below
        if lengths is None:
            return
        lengths = checked_lengths(lengths, steps)
        self.sorted_lengths, perm = lengths.sort(descending=True, stable=True)
        self.perm = perm
        self.inverse = torch.empty_like(perm)
        self.inverse[perm] = torch.arange(perm.numel())
        # batch_sizes over the steps some row runs: what torch's packed calls take.
        self.packed_sizes = batch_sizes_of(self.sorted_lengths)
        self.batch_sizes = self.packed_sizes.tolist()
        self.batch_sizes += [0] * (steps - len(self.batch_sizes))
        self._layouts: dict[torch.device, PackedLayout] = {}
        if reverse:
            # Reversal within each sequence: step t <-> length-1-t; padding stays where it is.
            t = torch.arange(steps).unsqueeze(1)
            valid = t < self.sorted_lengths.unsqueeze(0)  # (T, B) in canonical order
            self.time_index = torch.where(valid, self.sorted_lengths - 1 - t, t)

    def rows(self, state: Tensor) -> Tensor:
        """(B, .) in canonical row order."""
        return state if self.perm is None else state.index_select(0, self.perm.to(state.device))

    def unrows(self, state: Tensor) -> Tensor:
        return state if self.perm is None else state.index_select(0, self.inverse.to(state.device))

    def _flip(self, seq: Tensor) -> Tensor:
        if not self.reverse:
            return seq
        if self.perm is None:
            return seq.flip(0)
        index = self.time_index.to(seq.device).unsqueeze(2).expand(seq.shape)
        return seq.gather(0, index)

    def apply(self, seq: Tensor) -> Tensor:
        """(T, B, .) in the caller's arrangement -> canonical."""
        if self.perm is not None:
            seq = seq.index_select(1, self.perm.to(seq.device))
        return self._flip(seq)

    def restore(self, seq: Tensor) -> Tensor:
        """(T, B, .) canonical -> the caller's arrangement."""
        seq = self._flip(seq)  # the reversal is its own inverse
        return seq if self.perm is None else seq.index_select(1, self.inverse.to(seq.device))

    def _layout(self, device: torch.device) -> PackedLayout:
        layout = self._layouts.get(device)
        if layout is None:
            steps = len(self.batch_sizes or ())
            layout = PackedLayout(self.packed_sizes, device, steps=steps)
            self._layouts[device] = layout
        return layout

    def pack(self, seq: Tensor) -> Tensor:
        """(T, B, F) canonical -> (N, F): the valid rows, step after step (step t's are the
        batch_sizes[t] rows from sum(batch_sizes[:t])); without lengths a view, N = T * B."""
        if self.batch_sizes is None:
            return seq.reshape(-1, seq.shape[2])
        layout = self._layout(seq.device)
        return take_rows(seq.reshape(-1, seq.shape[2]), layout.flat, zero_row=False)

    def unpack(self, data: Tensor, steps: int) -> Tensor:
        """(N, F) from ``pack`` -> (T, B, F) canonical, zero past each length."""
        if self.batch_sizes is None:
            return data.view(steps, -1, data.shape[1])
        layout = self._layout(data.device)
        return take_rows(data, layout.where, zero_row=True).view(steps, -1, data.shape[1])


def flat_params(w: LayerWeights) -> list[Tensor]:
    """One layer's parameters in the order torch's ``_VF`` calls take them."""
    params = [w.w_ih, w.w_hh]
    if w.b_ih is not None and w.b_hh is not None:
        params += [w.b_ih, w.b_hh]
    return params + ([w.w_hr] if w.w_hr is not None else [])


def check_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> None:
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None, as in torch's modules")


def _hx(states: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
    """The LSTM's calls take (h, c); the GRU's and RNN's take h alone."""
    return tuple(states) if len(states) > 1 else states[0]


# cuDNN's RNNs want every weight in one buffer (torch.nn's modules keep them there, see
# flatten_parameters) and warn on each call that gets separate tensors, before copying them into
# one. fastpar's modules hold their parameters as separate tensors, so the copy (one pass over
# the weights, small next to the recurrence) is expected here; its warning is not the user's.
_CUDNN_COMPACTS = "RNN module weights are not part of single contiguous chunk of memory"


@contextlib.contextmanager
def _expected_cudnn_compaction(x: Tensor) -> Iterator[None]:
    if x.device.type != "cuda":
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CUDNN_COMPACTS)
        yield


def vf_layer(
    vf: VFCall,
    x: Tensor,
    states: Sequence[Tensor],
    w: LayerWeights,
    arrange: Arrangement,
    *,
    differentiable: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer and direction through ``vf``, lengths and reversal by ``arrange``; without
    autograd unless ``differentiable``.

    Arguments:
        vf: torch._VF.lstm, gru, rnn_tanh or rnn_relu.
        x: (T, B, I) layer input; states: the initial states, each (B, .); w: the weights.

    Returns:
        out: (T, B, P) zero past each length; the final states, each (B, .).
    """
    hx = _hx([arrange.rows(s).unsqueeze(0) for s in states])
    params = flat_params(w)
    has_bias = w.b_ih is not None
    xc = arrange.apply(x)
    autograd = contextlib.nullcontext() if differentiable else torch.no_grad()
    with autograd, _expected_cudnn_compaction(x):
        if arrange.batch_sizes is None:
            out, *finals = vf(xc, hx, params, has_bias, 1, 0.0, False, False, False)
        else:
            out_data, *finals = vf(
                arrange.pack(xc), arrange.packed_sizes, hx, params, has_bias, 1, 0.0, False, False
            )
            out = arrange.unpack(out_data, x.shape[0])
    return arrange.restore(out), tuple(arrange.unrows(f[0]) for f in finals)


def double_backward_grads(
    vf: VFCall,
    inputs: Sequence[Tensor | None],
    states: int,
    grad_outputs: Sequence[Tensor],
    needs_input_grad: Sequence[bool],
    arrange: Arrangement,
) -> list[Tensor | None]:
    """A layer op's gradients as a graph autograd can differentiate again, for a backward run
    with create_graph=True (a double backward: a gradient penalty, MAML): the ops' own backward
    kernels have no derivative, so the layer is recomputed with ``vf`` under autograd (torch's
    differentiable loop, torch.nn's double backward) and differentiated.

    Arguments:
        vf: torch._VF.lstm, gru, rnn_tanh or rnn_relu.
        inputs: x, the `states` initial states, then w_ih, w_hh, b_ih, b_hh (and w_hr): the
            op's differentiable inputs in its order.
        grad_outputs: the gradients of out and of each final state.
        needs_input_grad: the op's ctx.needs_input_grad (its leading entries match `inputs`).
        arrange: the op's Arrangement of lengths and reversal.

    Returns:
        A gradient per entry of `inputs` (None where not needed).
    """
    x, initial, weights = inputs[0], inputs[1 : 1 + states], inputs[1 + states :]
    w = LayerWeights(*weights, *[None] * (5 - len(weights)))
    with torch.enable_grad():
        out, finals = vf_layer(vf, x, initial, w, arrange, differentiable=True)  # type: ignore[arg-type]
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    grads = torch.autograd.grad(
        (out, *finals), [inputs[i] for i in wanted], grad_outputs, create_graph=True,
        allow_unused=True,
    )  # fmt: skip
    result: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads, strict=True):
        result[i] = grad
    return result


def vf_whole_stack(
    vf: VFCall,
    x: Tensor,
    states: Sequence[Tensor],
    weights: Sequence[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    lengths: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """torch's modules' own call: the whole stack in one ``vf`` under torch's autograd (dropout
    from torch's generator, as the module draws it), packed through batch_sizes with
    ``lengths`` as torch.nn.LSTM packs a PackedSequence. Returns (out, *final states), out
    (T, B, D*P) zero past each length."""
    params = [t for w in weights for t in flat_params(w)]
    has_bias = weights[0].b_ih is not None
    options = (has_bias, num_layers, dropout, training, bidirectional)
    with _expected_cudnn_compaction(x):
        if lengths is None:
            return tuple(vf(x, _hx(states), params, *options, False))
        lengths = checked_lengths(lengths, x.shape[0])
        sorted_lengths, order = lengths.sort(descending=True, stable=True)
        batch_sizes = batch_sizes_of(sorted_lengths)
        layout = PackedLayout(batch_sizes, x.device, steps=x.shape[0])
        # fastpar's modules pass a packed batch's lengths, sorted already.
        in_order = torch.equal(order, torch.arange(order.numel()))
        if not in_order:
            inverse = order.argsort().to(x.device, non_blocking=True)
            order = order.to(x.device, non_blocking=True)
            x, states = x.index_select(1, order), [s.index_select(1, order) for s in states]
        out_data, *finals = vf(layout.pack(x), batch_sizes, _hx(states), params, *options)
    results = (layout.pad(out_data), *finals)
    return results if in_order else tuple(r.index_select(1, inverse) for r in results)


def eager_whole_stack(x: Tensor, lengths: Tensor | None) -> bool:
    """Whether to run the whole stack as torch's module does (``vf_whole_stack``). Outside
    torch.compile the custom op is not needed, and per layer it only adds dispatch overhead
    (0.9 ms a layer, 13% for the LSTM at B8 T256 H64). With lengths on CPU the op stays, as its
    backward beats torch's packed one (forward+backward on CPU, one thread, at the four CPU
    benchmark shapes: 0.4-0.9x for the LSTM, 0.3-0.9x for the GRU and the tanh RNN); on CUDA
    torch's packed call (cuDNN's) runs, which the op's step loop backward was never measured
    against. Inside ``per_layer_ops()`` the ops run (a pipeline stage splitting its backward
    reroutes them), unless saved tensors pass through hooks: torch.utils.checkpoint recomputes
    the forward outside that context and must see the same ops, and no split happens there.
    Under torch.func: torch's padded call where a transform differentiates (torch.func cannot
    differentiate the ops; torch's packed call fails under it, as torch.nn.LSTM's does, so with
    lengths the op says so), the ops under vmap alone (torch's call has no batching rule)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return lengths is None and differentiating_transform_active()
    if _PER_LAYER.get() != 0 and not saved_tensor_hooks_active():
        return False
    return lengths is None or x.device.type == "cuda"


def saved_tensor_hooks_active() -> bool:
    """Whether saved tensors pass through hooks (torch.utils.checkpoint(use_reentrant=False),
    save_on_cpu): the forward may be recomputed in the backward, outside any context the
    forward ran in. torch has no public query."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


_PER_LAYER: contextvars.ContextVar[int] = contextvars.ContextVar("per_layer_ops", default=0)


@contextlib.contextmanager
def per_layer_ops() -> Iterator[None]:
    """Run the stacks through their per-layer custom ops even where ``eager_whole_stack``
    would call torch's whole-stack kernel, so that a torch function mode sees every layer."""
    token = _PER_LAYER.set(_PER_LAYER.get() + 1)
    try:
        yield
    finally:
        _PER_LAYER.reset(token)


def autocast_layer(
    x: Tensor, states: tuple[Tensor, ...], w: LayerWeights
) -> tuple[Tensor, tuple[Tensor, ...], LayerWeights]:
    """Under autocast, everything in autocast's dtype (the custom ops are outside its lists);
    otherwise, and for float64 weights (which autocast leaves alone), unchanged."""
    if not torch.is_autocast_enabled(x.device.type) or w.w_ih.dtype == torch.float64:
        return x, states, w
    dtype = torch.get_autocast_dtype(x.device.type)
    return (
        x.to(dtype),
        tuple(s.to(dtype) for s in states),
        LayerWeights(*(t.to(dtype) if t is not None else None for t in w)),
    )


# Whether autocast knows a device type, asked once per type: torch.compile reads this dict as
# a constant, where torch.amp.is_autocast_available is a graph break (which fullgraph=True
# refuses) in torch releases before 2.13. The usual devices are asked at import, outside any
# compilation.
_autocast_available: dict[str, bool] = {
    kind: torch.amp.is_autocast_available(kind) for kind in ("cpu", "cuda")
}


def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available(device_type)``, which torch.compile can trace."""
    available = _autocast_available.get(device_type)
    if available is None:
        available = _autocast_available[device_type] = torch.amp.is_autocast_available(device_type)
    return available


def without_autocast(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` with autocast off on the device of its first tensor argument (or of a tuple's): a
    backward called inside an autocast region (``loss.backward()`` under ``torch.autocast``,
    which torch's modules allow) must not have its float32 (opmath) GEMMs cast to autocast's
    dtype, where they would meet float32 operands (a dtype error) or lose precision."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        leaves = pytree.tree_leaves(args)
        device = next((a.device.type for a in leaves if isinstance(a, Tensor)), None)
        if device is None or not autocast_available(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a backward computes in: float32 for half types (torch's opmath)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class BackwardInputs(NamedTuple):
    """A layer's saved tensors in the canonical arrangement and the backward's dtype."""

    x: Tensor  # (T, B, I)
    hs: Tensor  # (T + 1, B, P): h0, then out (h_t at hs[t + 1]; zero past each length)
    dhs: Tensor  # (T + 1, B, P): dout at dhs[t + 1] with dh_n added at the last valid step
    # (past each length: dout as given, which a backward must not read); dhs[0] zero (for dh0)


def backward_inputs(
    arrange: Arrangement, x: Tensor, h0: Tensor, out: Tensor, dout: Tensor, dh_n: Tensor
) -> BackwardInputs:
    """``BackwardInputs`` from the caller's (T, B, .) x, out, dout and (B, P) h0, dh_n."""
    dtype = opmath_dtype(x.dtype)
    T, B, P = out.shape
    hs = x.new_empty(T + 1, B, P, dtype=dtype)
    hs[0] = arrange.rows(h0)
    hs[1:] = arrange.apply(out)
    dhs = x.new_empty(T + 1, B, P, dtype=dtype)
    dhs[0].zero_()
    dhs[1:] = arrange.apply(dout)
    dh_n = arrange.rows(dh_n).to(dtype)
    if arrange.batch_sizes is None:
        dhs[T] += dh_n
    else:
        last = arrange.sorted_lengths.to(x.device)
        dhs.index_put_((last, torch.arange(B, device=x.device)), dh_n, accumulate=True)
    return BackwardInputs(arrange.apply(x).to(dtype), hs, dhs)
