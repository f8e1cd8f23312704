"""The parameters whose gradient a split backward adds itself, and adding it through autograd's
own accumulation, so that every hook on the parameter runs as in a whole backward.

A split Function takes such a parameter detached (`hold`): its graph has no edge to the
parameter's AccumulateGrad node, which the input pass would otherwise run with no gradient
(autograd calls that node's hooks with None). The Function keeps the edge instead, and the
weight pass feeds the node the gradient (`accumulate`): the tensor hooks, the node's pre-hooks
and hooks (`node.register_prehook` / `register_hook`, which nothing can ask the node about) and
the post-accumulate hooks then run once, on the micro-batch's whole gradient of the parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = [
    "HeldParameter",
    "WeightGrad",
    "accumulate",
    "anchor",
    "defer_or_accumulate",
    "deferrable",
    "hold",
    "needs_grad",
]

WeightGrad = tuple[GradientEdge, Tensor]
"""A gradient and the edge into the AccumulateGrad node of the parameter it is for."""


class HeldParameter(NamedTuple):
    """A parameter a split Function took detached, and the edge into its AccumulateGrad node
    (holding it keeps the node, and hooks registered on it, alive until the weight pass)."""

    param: Tensor
    edge: GradientEdge

    def grad(self, grad: Tensor) -> WeightGrad:
        return self.edge, grad


def deferrable(param: Tensor) -> bool:
    """Whether `param`'s gradient may skip autograd's graph and be added by a weight pass: a
    leaf without tensor hooks. A computed weight (a cast, a scaled or tied embedding, a
    parametrization) must pass its gradient on through autograd to the parameter it came
    from; tensor hooks (`register_hook`, `register_post_accumulate_grad_hook`) registered by
    the forward keep the whole backward's timing (the input pass). Hooks on the parameter's
    AccumulateGrad node cannot be seen: `accumulate` runs them in the weight pass."""
    return param.is_leaf and not param._backward_hooks and not param._post_accumulate_grad_hooks


def hold(weight: Tensor | None) -> tuple[Tensor | None, HeldParameter | None]:
    """What a split Function takes `weight` as, at the forward: a deferrable parameter that
    wants a gradient detached, with its `HeldParameter`; anything else as it is (its gradient
    goes through autograd), with None."""
    if weight is None or not weight.requires_grad or not deferrable(weight):
        return weight, None
    return weight.detach(), HeldParameter(weight, get_gradient_edge(weight))


def anchor() -> Tensor:
    """An empty leaf that wants a gradient, for a split Function's inputs: its outputs then
    want one (and its backward runs) though its other such inputs may all be held."""
    return torch.empty(0, requires_grad=True)


def accumulate(grads: Sequence[WeightGrad]) -> None:
    """Adds every gradient into its parameter's `.grad` as a whole backward does: one autograd
    call over them all, which sums the gradients of a parameter given more than once and runs
    its AccumulateGrad node, hooks included, once on the sum."""
    if grads:
        edges, tensors = zip(*grads, strict=True)
        torch.autograd.backward(list(edges), list(tensors))


def defer_or_accumulate(
    defer: Callable[[Callable[[], list[WeightGrad]]], None],
    held: Sequence[HeldParameter | None],
    grads: Callable[[], list[WeightGrad]],
) -> None:
    """In a split Function's backward: hands `grads` (the held parameters' gradients) to the
    weight pass, or adds them now where a held parameter got a tensor hook since the forward
    (its hook then runs in the input pass, as in a whole backward)."""
    held = [h for h in held if h is not None]
    if not held:
        return
    if all(deferrable(h.param) for h in held):
        defer(grads)
    else:
        accumulate(grads())


def needs_grad(param: Tensor | None) -> bool:
    """Whether `param` is a tensor that wants a gradient."""
    return param is not None and param.requires_grad
