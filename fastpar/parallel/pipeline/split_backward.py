"""Splitting a stage's backward into an input-gradient pass (I) and a weight-gradient pass (W).

Zero-bubble schedules send the gradient of a stage's input back as soon as it is computed and
run the weight gradients later, in time the stage would otherwise spend waiting. Autograd
computes both in one backward, so the forward of such a stage runs under `weight_split`: a
torch function mode that reroutes every call of a registered function (F.linear, F.embedding,
F.layer_norm, and fastpar's recurrences in split_recurrence.py) to a split implementation. Its
autograd backward returns the input gradient and, instead of the weight gradient, files a job
(a closure over the tensors it needs, e.g. the layer's input and output gradient) with the
micro-batch's `DeferredWeights`; the W pass runs the jobs, which add into `param.grad`. The
gradients equal those of a whole backward.

Only a parameter passed as it is and without gradient hooks has its gradient deferred
(`grad_accumulate.deferrable`, decided in the backward): a computed weight (a cast, a scaled or
tied embedding, a parametrization) gets its gradient in the I pass and hands it on through
autograd to the parameter it came from, and a hooked parameter's gradient goes through
autograd's accumulation, which runs the hooks on it.

Any other operation keeps its usual backward: parameters used there get their gradient in the
I pass (still correct; only that part of the work is not deferred), which `weight_split`
reports once per stage. So do F.linear and F.layer_norm under autocast, which casts them, and
every registered function inside torch.utils.checkpoint(use_reentrant=False), which recomputes
the forward outside the split.

The protocol a module offers the split through (`WeightSplit`): register the function its
forward calls with `register_weight_split(function, split)`; while a pipeline stage runs its
forward, `split(defer, *args, **kwargs)` replaces `function(*args, **kwargs)` and passes every
weight-gradient closure to `defer`. The function must reach torch's function-mode dispatch: a
torch function called through `torch.nn.functional` or `torch.ops`, or a Python function that
calls `torch.overrides.handle_torch_function` when `has_torch_function(...)` is true.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fastpar._logging import get_logger, log_once
from fastpar.ops.aten_common import per_layer_ops, saved_tensor_hooks_active
from fastpar.parallel.pipeline.grad_accumulate import accumulate as _accumulate
from fastpar.parallel.pipeline.grad_accumulate import deferrable as _deferrable
from fastpar.parallel.pipeline.grad_accumulate import needs_grad as _needs

__all__ = ["DeferredWeights", "WeightSplit", "register_weight_split", "weight_split"]

logger = get_logger(__name__)

WeightJob = Callable[[], None]
"""Adds some parameters' gradients into their `.grad`."""


class WeightSplit(Protocol):
    """A function's split implementation: the same output as the function, with an autograd
    backward that computes input gradients only and hands `defer` the weight-gradient work.
    May return NotImplemented to run the function unchanged (e.g. for an unsupported option)."""

    def __call__(self, defer: Callable[[WeightJob], None], /, *args: Any, **kwargs: Any) -> Any: ...


_SPLITS: dict[Callable[..., Any] | str, WeightSplit] = {}
_REPORTED: set[str] = set()  # stages whose unsplit parameters were reported


def register_weight_split(function: Callable[..., Any] | str, split: WeightSplit) -> None:
    """Run `split` in place of `function` in the forward of stages whose backward is split.
    `function` may be a custom op's qualified name ("namespace::op"), so that registering it
    needs no import of the module that defines the op."""
    _SPLITS[function] = split


def _registered_split(func: Any) -> WeightSplit | None:
    split = _SPLITS.get(func)
    if split is None and isinstance(func, torch._ops.OpOverload):
        split = _SPLITS.get(func.name())
    return split


class DeferredWeights:
    """The weight-gradient jobs of one micro-batch on one stage, filed during its I pass."""

    def __init__(self) -> None:
        self.jobs: list[WeightJob] = []

    def defer(self, job: WeightJob) -> None:
        self.jobs.append(job)

    def run(self) -> None:
        """The W pass: every job once, in the order they were filed."""
        jobs, self.jobs = self.jobs, []
        with torch.no_grad():  # like autograd's own accumulation: no graph of the gradients
            for job in jobs:
                job()


class _SplitMode(TorchFunctionMode):
    def __init__(self, deferred: DeferredWeights, covered: set[int]) -> None:
        super().__init__()
        self._defer = deferred.defer
        self._covered = covered

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        split = _registered_split(func)
        # Inside torch.utils.checkpoint(use_reentrant=False) the forward is recomputed in the
        # backward, outside the split, and must save what it saved: the op keeps its backward.
        if split is not None and torch.is_grad_enabled() and not saved_tensor_hooks_active():
            out = split(self._defer, *args, **kwargs)
            if out is not NotImplemented:
                for value in (*args, *kwargs.values()):
                    if isinstance(value, nn.Parameter) and _deferrable(value):
                        self._covered.add(id(value))
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def weight_split(module: nn.Module, deferred: DeferredWeights, name: str) -> Iterator[None]:
    """Run `module`'s forward with its registered operations split (see the module docstring).

    Arguments:
        module: the stage's module (its parameters are checked for coverage).
        deferred: receives this micro-batch's weight-gradient jobs during its backward.
        name: the stage, for the one-time log of parameters that cannot be deferred.
    """
    covered: set[int] = set()
    with _SplitMode(deferred, covered), per_layer_ops():  # the mode sees each layer's op
        yield
    if name in _REPORTED:  # walking the parameters costs per micro-batch: once per stage
        return
    _REPORTED.add(name)
    whole = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if whole:
        log_once(
            logger,
            f"{name}: no weight-gradient split for {', '.join(whole)} (see "
            "register_weight_split); their gradients are computed in the input pass",
        )


# --- Linear ------------------------------------------------------------------------------------


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, defer: Any) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias, ctx.defer = bias, defer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        bias = ctx.bias
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
        # A computed weight or bias (the LSTM's b_ih + b_hh) or a hooked one: now, via autograd.
        later_w = ctx.needs_input_grad[1] and _deferrable(weight)
        later_b = ctx.needs_input_grad[2] and _deferrable(bias)
        now_w = ctx.needs_input_grad[1] and not later_w
        now_b = ctx.needs_input_grad[2] and not later_b
        grad_w = rows.t() @ x.reshape(-1, x.shape[-1]) if now_w else None
        grad_b = rows.sum(0) if now_b else None

        def job() -> None:
            if later_w and weight.grad is not None:
                weight.grad.addmm_(rows.t(), x.reshape(-1, x.shape[-1]))  # no temporary
            elif later_w:
                weight.grad = rows.t() @ x.reshape(-1, x.shape[-1])
            if later_b:
                _accumulate(bias, rows.sum(0))

        if later_w or later_b:
            ctx.defer(job)
        return grad_x, grad_w, grad_b, None


def _autocast(input: Tensor) -> bool:
    """Whether autocast would cast this op's tensors: then its gradients flow through the casts
    (in the autocast dtype, cast back to each parameter's), which the split Functions below
    do not model, so the op keeps its whole backward."""
    return torch.is_autocast_enabled(input.device.type)


def _split_linear(defer: Any, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Any:
    if not (_needs(weight) or _needs(bias)) or _autocast(input):
        return NotImplemented
    return _Linear.apply(input, weight, bias, defer)


# --- Embedding ---------------------------------------------------------------------------------


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, weight: Tensor, ids: Tensor, padding_idx: int, scale: bool, defer: Any
    ) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.scale, ctx.defer = weight, padding_idx, scale, defer
        return F.embedding(ids, weight, None if padding_idx < 0 else padding_idx,
                           scale_grad_by_freq=scale)  # fmt: skip

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        (ids,) = ctx.saved_tensors
        weight, padding_idx, scale = ctx.weight, ctx.padding_idx, ctx.scale

        def grad_weight() -> Tensor:
            return torch.ops.aten.embedding_dense_backward(
                grad, ids, weight.shape[0], padding_idx, scale
            )

        if not _deferrable(weight):  # computed or hooked: now, via autograd
            return grad_weight(), None, None, None, None
        ctx.defer(lambda: _accumulate(weight, grad_weight()))
        return None, None, None, None, None


def _split_embedding(
    defer: Any,
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Any:
    del norm_type  # used only with max_norm
    if max_norm is not None or sparse or not _needs(weight):
        return NotImplemented
    padding = -1 if padding_idx is None else padding_idx % weight.shape[0]
    return _Embedding.apply(weight, input, padding, scale_grad_by_freq, defer)


# --- LayerNorm ---------------------------------------------------------------------------------


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, shape: list[int], eps: float,
        defer: Any,
    ) -> Tensor:  # fmt: skip
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.bias, ctx.shape, ctx.defer = bias, shape, defer
        return out

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, mean, rstd, weight = ctx.saved_tensors
        bias, shape = ctx.bias, ctx.shape
        # A computed weight or bias (e.g. cast to float32) or a hooked one: now, via autograd.
        later_w = ctx.needs_input_grad[1] and _deferrable(weight)
        later_b = ctx.needs_input_grad[2] and _deferrable(bias)
        now = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not later_w,
               ctx.needs_input_grad[2] and not later_b]  # fmt: skip
        grad_x = grad_w = grad_b = None
        if any(now):
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad, x, shape, mean, rstd, weight, bias, now
            )

        def job() -> None:
            _, later_grad_w, later_grad_b = torch.ops.aten.native_layer_norm_backward(
                grad, x, shape, mean, rstd, weight, bias, [False, later_w, later_b]
            )
            if later_w:
                _accumulate(weight, later_grad_w)
            if later_b:
                _accumulate(bias, later_grad_b)

        if later_w or later_b:
            ctx.defer(job)
        return grad_x, grad_w, grad_b, None, None, None


def _split_layer_norm(
    defer: Any,
    input: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Any:
    if weight is None or not (_needs(weight) or _needs(bias)) or _autocast(input):
        return NotImplemented
    return _LayerNorm.apply(input, weight, bias, list(normalized_shape), eps, defer)


register_weight_split(F.linear, _split_linear)
register_weight_split(F.embedding, _split_embedding)
register_weight_split(F.layer_norm, _split_layer_norm)


def _recurrence_split(name: str) -> WeightSplit:
    """split_recurrence's `name`, imported when a stage first calls the op: it imports the ops
    (and Triton), which `import fastpar.parallel` must not."""

    def split(defer: Callable[[WeightJob], None], /, *args: Any, **kwargs: Any) -> Any:
        from fastpar.parallel.pipeline import split_recurrence

        return getattr(split_recurrence, name)(defer, *args, **kwargs)

    return split


for _op, _name in (
    ("fastpar::lstm_recurrence", "split_lstm_recurrence"),
    ("fastpar::cell_recurrence", "split_cell_recurrence"),
    ("fastpar::lstm_aten_layer", "split_lstm_aten_layer"),
):
    register_weight_split(_op, _recurrence_split(_name))
